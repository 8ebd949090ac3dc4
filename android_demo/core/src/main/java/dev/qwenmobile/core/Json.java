package dev.qwenmobile.core;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * A small strict JSON parser (RFC 8259) of our own.
 *
 * <p>Why not a library: Android ships its own {@code org.json}, which differs from the JVM's JSON-java
 * and is absent from a plain JVM test classpath; Gson, Moshi and Jackson would be a download the build
 * machine here cannot make; and none of them keeps a number's text. This parser gives the same values
 * on the JVM and on Android: objects as insertion-ordered {@code Map<String, Object>}, arrays as
 * {@code List<Object>}, strings, {@code Boolean}, {@code null}, and numbers as {@link Num}, which keeps
 * the literal so that a float32 logit or a 64-bit seed is read exactly. A 12 MB tokenizer.json parses
 * in well under a second.
 */
public final class Json {
    /** A JSON number, kept as written. */
    public static final class Num extends Number {
        private static final long serialVersionUID = 1L;
        public final String text;

        Num(String text) {
            this.text = text;
        }

        @Override public int intValue() {
            long value = longValue();
            if (value != (int) value) throw new JsonException("number out of int range: " + text);
            return (int) value;
        }

        @Override public long longValue() {
            if (isIntegral()) return Long.parseLong(text);
            double value = Double.parseDouble(text);
            if (value != Math.rint(value)) throw new JsonException("not an integer: " + text);
            return (long) value;
        }

        @Override public float floatValue() {
            return Float.parseFloat(text);
        }

        @Override public double doubleValue() {
            return Double.parseDouble(text);
        }

        public boolean isIntegral() {
            for (int i = 0; i < text.length(); i++) {
                char c = text.charAt(i);
                if (c == '.' || c == 'e' || c == 'E') return false;
            }
            return true;
        }

        @Override public String toString() {
            return text;
        }

        @Override public boolean equals(Object other) {
            return other instanceof Num && ((Num) other).text.equals(text);
        }

        @Override public int hashCode() {
            return text.hashCode();
        }
    }

    /** Malformed JSON, or a value of another type than the caller asked for. */
    public static final class JsonException extends RuntimeException {
        private static final long serialVersionUID = 1L;

        public JsonException(String message) {
            super(message);
        }
    }

    private final String s;
    private int i;

    private Json(String s) {
        this.s = s;
    }

    public static Object parse(String text) {
        Json parser = new Json(text);
        parser.skipSpace();
        Object value = parser.value();
        parser.skipSpace();
        if (parser.i != text.length()) throw parser.error("trailing characters");
        return value;
    }

    public static Object parse(Path path) throws IOException {
        return parse(new String(Files.readAllBytes(path), StandardCharsets.UTF_8));
    }

    private JsonException error(String what) {
        int line = 1, column = 1;
        for (int k = 0; k < Math.min(i, s.length()); k++) {
            if (s.charAt(k) == '\n') {
                line++;
                column = 1;
            } else {
                column++;
            }
        }
        return new JsonException(what + " at line " + line + ", column " + column);
    }

    private void skipSpace() {
        while (i < s.length()) {
            char c = s.charAt(i);
            if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
            i++;
        }
    }

    private Object value() {
        if (i >= s.length()) throw error("unexpected end");
        char c = s.charAt(i);
        switch (c) {
            case '{': return object();
            case '[': return array();
            case '"': return string();
            case 't': return literal("true", Boolean.TRUE);
            case 'f': return literal("false", Boolean.FALSE);
            case 'n': return literal("null", null);
            default:
                if (c == '-' || (c >= '0' && c <= '9')) return number();
                throw error("unexpected character '" + c + "'");
        }
    }

    private Object literal(String word, Object value) {
        if (!s.startsWith(word, i)) throw error("invalid literal");
        i += word.length();
        return value;
    }

    private Map<String, Object> object() {
        Map<String, Object> map = new LinkedHashMap<>();
        i++;
        skipSpace();
        if (i < s.length() && s.charAt(i) == '}') {
            i++;
            return map;
        }
        while (true) {
            skipSpace();
            if (i >= s.length() || s.charAt(i) != '"') throw error("expected a string key");
            String key = string();
            skipSpace();
            expect(':');
            skipSpace();
            map.put(key, value());
            skipSpace();
            if (i < s.length() && s.charAt(i) == ',') {
                i++;
                continue;
            }
            expect('}');
            return map;
        }
    }

    private List<Object> array() {
        List<Object> list = new ArrayList<>();
        i++;
        skipSpace();
        if (i < s.length() && s.charAt(i) == ']') {
            i++;
            return list;
        }
        while (true) {
            skipSpace();
            list.add(value());
            skipSpace();
            if (i < s.length() && s.charAt(i) == ',') {
                i++;
                continue;
            }
            expect(']');
            return list;
        }
    }

    private void expect(char c) {
        if (i >= s.length() || s.charAt(i) != c) throw error("expected '" + c + "'");
        i++;
    }

    private String string() {
        i++; // the opening quote
        int start = i;
        while (i < s.length()) { // fast path: no escapes
            char c = s.charAt(i);
            if (c == '"') {
                String plain = s.substring(start, i);
                i++;
                return plain;
            }
            if (c == '\\') break;
            if (c < 0x20) throw error("control character in a string");
            i++;
        }
        StringBuilder out = new StringBuilder(s.substring(start, i));
        while (true) {
            if (i >= s.length()) throw error("unterminated string");
            char c = s.charAt(i++);
            if (c == '"') return out.toString();
            if (c < 0x20) throw error("control character in a string");
            if (c != '\\') {
                out.append(c);
                continue;
            }
            if (i >= s.length()) throw error("unterminated escape");
            char e = s.charAt(i++);
            switch (e) {
                case '"': out.append('"'); break;
                case '\\': out.append('\\'); break;
                case '/': out.append('/'); break;
                case 'b': out.append('\b'); break;
                case 'f': out.append('\f'); break;
                case 'n': out.append('\n'); break;
                case 'r': out.append('\r'); break;
                case 't': out.append('\t'); break;
                case 'u':
                    if (i + 4 > s.length()) throw error("short \\u escape");
                    int code = 0;
                    for (int k = 0; k < 4; k++) {
                        int digit = Character.digit(s.charAt(i + k), 16);
                        if (digit < 0) throw error("bad \\u escape");
                        code = code * 16 + digit;
                    }
                    i += 4;
                    out.append((char) code); // surrogate pairs arrive as two escapes, in order
                    break;
                default:
                    throw error("bad escape \\" + e);
            }
        }
    }

    private Num number() {
        int start = i;
        if (s.charAt(i) == '-') i++;
        if (i < s.length() && s.charAt(i) == '0') {
            i++;
        } else if (!digits()) {
            throw error("bad number");
        }
        if (i < s.length() && s.charAt(i) == '.') {
            i++;
            if (!digits()) throw error("bad fraction");
        }
        if (i < s.length() && (s.charAt(i) == 'e' || s.charAt(i) == 'E')) {
            i++;
            if (i < s.length() && (s.charAt(i) == '+' || s.charAt(i) == '-')) i++;
            if (!digits()) throw error("bad exponent");
        }
        return new Num(s.substring(start, i));
    }

    private boolean digits() {
        int start = i;
        while (i < s.length() && s.charAt(i) >= '0' && s.charAt(i) <= '9') i++;
        return i > start;
    }

    // ---- typed access, with errors that name the field --------------------------------------------

    @SuppressWarnings("unchecked")
    public static Map<String, Object> obj(Object value, String what) {
        if (value instanceof Map) return (Map<String, Object>) value;
        throw new JsonException(what + ": expected an object");
    }

    @SuppressWarnings("unchecked")
    public static List<Object> arr(Object value, String what) {
        if (value instanceof List) return (List<Object>) value;
        throw new JsonException(what + ": expected an array");
    }

    public static String str(Object value, String what) {
        if (value instanceof String) return (String) value;
        throw new JsonException(what + ": expected a string");
    }

    public static Num num(Object value, String what) {
        if (value instanceof Num) return (Num) value;
        throw new JsonException(what + ": expected a number");
    }

    public static boolean bool(Object value, String what) {
        if (value instanceof Boolean) return (Boolean) value;
        throw new JsonException(what + ": expected true or false");
    }

    public static int[] ints(Object value, String what) {
        List<Object> list = arr(value, what);
        int[] out = new int[list.size()];
        for (int k = 0; k < out.length; k++) out[k] = num(list.get(k), what).intValue();
        return out;
    }

    public static Map<String, Object> field(Map<String, Object> map, String key, String what) {
        if (!map.containsKey(key)) throw new JsonException(what + ": missing field " + key);
        return obj(map.get(key), what + "." + key);
    }

    public static List<String> strings(Object value, String what) {
        List<String> out = new ArrayList<>();
        for (Object item : arr(value, what)) out.add(str(item, what));
        return Collections.unmodifiableList(out);
    }
}
