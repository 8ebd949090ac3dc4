package dev.qwenmobile.core;

import java.util.regex.Pattern;

/**
 * tokenizer.json's regexes (written for Oniguruma, as the tokenizers library runs them) compiled
 * for java.util.regex, the same on the JVM and on Android (whose Pattern is ICU's).
 *
 * <p>One difference matters: Oniguruma's {@code \s} is Unicode White_Space, java.util.regex's is
 * ASCII unless UNICODE_CHARACTER_CLASS is set (which Android does not support). So {@code \s} and
 * {@code \S} are rewritten to the explicit White_Space set. Case-insensitive groups get Unicode
 * case folding, as Oniguruma's have. {@code \p{L}}, {@code \p{N}}, {@code \p{M}} are Unicode
 * general categories in both.
 */
final class Regexes {
    /** Unicode White_Space, Oniguruma's \s. */
    static final String WHITE_SPACE =
            "\\t\\n\\x0B\\f\\r\\x20\\x85\\xA0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000";

    private Regexes() {}

    static Pattern compile(String oniguruma) {
        return Pattern.compile(translate(oniguruma), Pattern.UNICODE_CASE);
    }

    static String translate(String pattern) {
        StringBuilder out = new StringBuilder(pattern.length() + 64);
        boolean inClass = false;
        for (int i = 0; i < pattern.length(); i++) {
            char c = pattern.charAt(i);
            if (c == '\\' && i + 1 < pattern.length()) {
                char n = pattern.charAt(i + 1);
                i++;
                if (n == 's') {
                    out.append(inClass ? WHITE_SPACE : "[" + WHITE_SPACE + "]");
                } else if (n == 'S') {
                    if (inClass) throw new IllegalArgumentException("\\S inside a character class is not supported: " + pattern);
                    out.append("[^").append(WHITE_SPACE).append(']');
                } else {
                    out.append(c).append(n);
                }
                continue;
            }
            if (c == '[' && !inClass) {
                inClass = true;
            } else if (c == ']' && inClass) {
                inClass = false;
            } else if (c == '[') {
                throw new IllegalArgumentException("nested character classes are not supported: " + pattern);
            }
            out.append(c);
        }
        return out.toString();
    }
}
