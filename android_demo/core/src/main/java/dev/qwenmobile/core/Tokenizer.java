package dev.qwenmobile.core;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.nio.file.Path;
import java.text.Normalizer;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.PriorityQueue;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * A byte-level BPE tokenizer that does what a tokenizer.json specifies, as the tokenizers
 * library does it: added tokens split out first (leftmost-longest, with their lstrip/rstrip),
 * the normalizer (NFC/NFD/NFKC/NFKD/Lowercase or a Sequence of them), the pre-tokenizer
 * (ByteLevel with GPT-2's regex, or Split with an explicit regex followed by
 * ByteLevel(use_regex=false), as Qwen2/Qwen3/Qwen3.5 have it, or a Sequence), BPE merges by
 * rank, and the ByteLevel decoder. Encoding adds no special tokens (the chat format spells them
 * out); the post-processor is not applied. Anything else in the file is refused when it loads.
 */
public final class Tokenizer {
    private final Map<String, Integer> vocab;
    private final String[] idToToken;
    private final Map<Long, long[]> merges = new HashMap<>(); // (left id, right id) -> {rank, merged id}
    private final boolean ignoreMerges;
    private final List<AddedToken> added = new ArrayList<>();
    private final java.util.Set<Character> addedFirstChars = new java.util.HashSet<>();
    private final Map<Integer, AddedToken> addedById = new HashMap<>();
    private final List<String> normalizers = new ArrayList<>();
    private final List<PreTokenizer> preTokenizers = new ArrayList<>();
    private final Map<String, int[]> cache = new LinkedHashMap<String, int[]>(1024, 0.75f, true) {
        private static final long serialVersionUID = 1L;

        @Override protected boolean removeEldestEntry(Map.Entry<String, int[]> eldest) {
            return size() > 20000;
        }
    };

    static final class AddedToken {
        final int id;
        final String content;
        final boolean special, lstrip, rstrip, singleWord, normalized;

        AddedToken(Map<String, Object> m) {
            id = Json.num(m.get("id"), "added_tokens.id").intValue();
            content = Json.str(m.get("content"), "added_tokens.content");
            special = Boolean.TRUE.equals(m.get("special"));
            lstrip = Boolean.TRUE.equals(m.get("lstrip"));
            rstrip = Boolean.TRUE.equals(m.get("rstrip"));
            singleWord = Boolean.TRUE.equals(m.get("single_word"));
            normalized = Boolean.TRUE.equals(m.get("normalized"));
        }
    }

    private static final class PreTokenizer {
        final Pattern pattern; // null: ByteLevel without regex
        final boolean byteLevel, addPrefixSpace, invert;
        final String behavior;

        PreTokenizer(Pattern pattern, boolean byteLevel, boolean addPrefixSpace, String behavior, boolean invert) {
            this.pattern = pattern;
            this.byteLevel = byteLevel;
            this.addPrefixSpace = addPrefixSpace;
            this.behavior = behavior;
            this.invert = invert;
        }
    }

    public static Tokenizer fromFile(Path path) throws IOException {
        return new Tokenizer(Json.obj(Json.parse(path), path.toString()));
    }

    public static Tokenizer fromJson(String json) {
        return new Tokenizer(Json.obj(Json.parse(json), "tokenizer.json"));
    }

    public Tokenizer(Map<String, Object> json) {
        Map<String, Object> model = Json.field(json, "model", "tokenizer.json");
        if (!"BPE".equals(model.get("type"))) throw unsupported("model.type " + model.get("type"));
        for (String key : new String[] {"continuing_subword_prefix", "end_of_word_suffix"}) {
            if (model.get(key) != null && !"".equals(model.get(key))) throw unsupported("model." + key);
        }
        if (Boolean.TRUE.equals(model.get("byte_fallback"))) throw unsupported("model.byte_fallback");
        ignoreMerges = Boolean.TRUE.equals(model.get("ignore_merges"));

        Map<String, Object> vocabJson = Json.field(model, "vocab", "model");
        vocab = new HashMap<>(vocabJson.size() * 2);
        int size = 0;
        for (Map.Entry<String, Object> e : vocabJson.entrySet()) {
            int id = Json.num(e.getValue(), "model.vocab").intValue();
            vocab.put(e.getKey(), id);
            size = Math.max(size, id + 1);
        }
        List<Object> addedJson = json.get("added_tokens") == null ? new ArrayList<Object>() : Json.arr(json.get("added_tokens"), "added_tokens");
        for (Object a : addedJson) {
            AddedToken token = new AddedToken(Json.obj(a, "added_tokens"));
            added.add(token);
            addedById.put(token.id, token);
            size = Math.max(size, token.id + 1);
        }
        idToToken = new String[size];
        for (Map.Entry<String, Integer> e : vocab.entrySet()) idToToken[e.getValue()] = e.getKey();
        for (AddedToken token : added) idToToken[token.id] = token.content;

        List<Object> mergeList = Json.arr(model.get("merges"), "model.merges");
        for (int rank = 0; rank < mergeList.size(); rank++) {
            Object m = mergeList.get(rank);
            String left, right;
            if (m instanceof String) {
                String pair = (String) m;
                int space = pair.indexOf(' ');
                if (space < 0 || pair.indexOf(' ', space + 1) >= 0) throw unsupported("merge \"" + pair + "\"");
                left = pair.substring(0, space);
                right = pair.substring(space + 1);
            } else {
                List<Object> pair = Json.arr(m, "model.merges");
                left = Json.str(pair.get(0), "merge");
                right = Json.str(pair.get(1), "merge");
            }
            Integer a = vocab.get(left), b = vocab.get(right), merged = vocab.get(left + right);
            if (a == null || b == null || merged == null) {
                throw new IllegalArgumentException("tokenizer.json: merge " + left + " " + right + " names a token not in the vocabulary");
            }
            merges.putIfAbsent(pairKey(a, b), new long[] {rank, merged});
        }
        readNormalizer(json.get("normalizer"));
        readPreTokenizer(json.get("pre_tokenizer"));
        if (preTokenizers.isEmpty() || !preTokenizers.get(preTokenizers.size() - 1).byteLevel) {
            throw unsupported("a pre-tokenizer that does not end with ByteLevel (not a byte-level BPE)");
        }
        for (AddedToken token : added) if (!token.content.isEmpty()) addedFirstChars.add(token.content.charAt(0));
        Object decoder = json.get("decoder");
        if (decoder != null && !"ByteLevel".equals(Json.obj(decoder, "decoder").get("type"))) {
            throw unsupported("decoder " + Json.obj(decoder, "decoder").get("type"));
        }
    }

    private static IllegalArgumentException unsupported(String what) {
        return new IllegalArgumentException("tokenizer.json: " + what + " is not supported by this tokenizer");
    }

    private void readNormalizer(Object value) {
        if (value == null) return;
        Map<String, Object> n = Json.obj(value, "normalizer");
        String type = Json.str(n.get("type"), "normalizer.type");
        if (type.equals("Sequence")) {
            for (Object item : Json.arr(n.get("normalizers"), "normalizer.normalizers")) readNormalizer(item);
        } else if (type.equals("NFC") || type.equals("NFD") || type.equals("NFKC") || type.equals("NFKD") || type.equals("Lowercase")) {
            normalizers.add(type);
        } else {
            throw unsupported("normalizer " + type);
        }
    }

    private void readPreTokenizer(Object value) {
        if (value == null) return;
        Map<String, Object> p = Json.obj(value, "pre_tokenizer");
        String type = Json.str(p.get("type"), "pre_tokenizer.type");
        switch (type) {
            case "Sequence":
                for (Object item : Json.arr(p.get("pretokenizers"), "pre_tokenizer.pretokenizers")) readPreTokenizer(item);
                break;
            case "ByteLevel": {
                boolean useRegex = !Boolean.FALSE.equals(p.get("use_regex"));
                preTokenizers.add(new PreTokenizer(useRegex ? Regexes.compile(ByteLevel.GPT2_PATTERN) : null, true,
                        Boolean.TRUE.equals(p.get("add_prefix_space")), "Isolated", false));
                break;
            }
            case "Split": {
                Map<String, Object> pattern = Json.field(p, "pattern", "Split");
                Pattern compiled;
                if (pattern.containsKey("Regex")) {
                    compiled = Regexes.compile(Json.str(pattern.get("Regex"), "Split.pattern.Regex"));
                } else {
                    compiled = Pattern.compile(Pattern.quote(Json.str(pattern.get("String"), "Split.pattern.String")));
                }
                String behavior = Json.str(p.get("behavior"), "Split.behavior");
                if (!java.util.Arrays.asList("Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous").contains(behavior)) {
                    throw unsupported("Split behavior " + behavior);
                }
                preTokenizers.add(new PreTokenizer(compiled, false, false, behavior, Boolean.TRUE.equals(p.get("invert"))));
                break;
            }
            default:
                throw unsupported("pre_tokenizer " + type);
        }
    }

    // ---- encoding ---------------------------------------------------------------------------------

    /** Token ids for {@code text}; no special tokens are added. */
    public int[] encode(String text) {
        List<Integer> ids = new ArrayList<>();
        for (Object part : splitAdded(text, false)) {
            if (part instanceof Integer) {
                ids.add((Integer) part);
                continue;
            }
            String normalized = normalize((String) part);
            for (Object inner : splitAdded(normalized, true)) {
                if (inner instanceof Integer) {
                    ids.add((Integer) inner);
                } else {
                    for (String piece : preTokenize((String) inner)) {
                        for (int id : bpe(piece)) ids.add(id);
                    }
                }
            }
        }
        int[] out = new int[ids.size()];
        for (int k = 0; k < out.length; k++) out[k] = ids.get(k);
        return out;
    }

    /** Text and added-token ids in order: the added tokens whose `normalized` flag equals {@code normalizedOnes}. */
    private List<Object> splitAdded(String text, boolean normalizedOnes) {
        List<Object> parts = new ArrayList<>();
        int start = 0, i = 0;
        while (i < text.length()) {
            if (!addedFirstChars.contains(text.charAt(i))) {
                i++;
                continue;
            }
            AddedToken best = null;
            for (AddedToken token : added) {
                if (token.normalized != normalizedOnes || token.content.isEmpty()) continue;
                if (text.startsWith(token.content, i) && (best == null || token.content.length() > best.content.length())) {
                    if (token.singleWord && !isWordBoundary(text, i, i + token.content.length())) continue;
                    best = token;
                }
            }
            if (best == null) {
                i++;
                continue;
            }
            int matchStart = i, matchEnd = i + best.content.length();
            if (best.lstrip) {
                while (matchStart > start && Character.isWhitespace(text.charAt(matchStart - 1))) matchStart--;
            }
            if (best.rstrip) {
                while (matchEnd < text.length() && Character.isWhitespace(text.charAt(matchEnd))) matchEnd++;
            }
            if (matchStart > start) parts.add(text.substring(start, matchStart));
            parts.add(best.id);
            start = i = matchEnd;
        }
        if (start < text.length()) parts.add(text.substring(start));
        return parts;
    }

    private static boolean isWordBoundary(String text, int start, int end) {
        boolean before = start > 0 && isWordChar(text.codePointBefore(start));
        boolean after = end < text.length() && isWordChar(text.codePointAt(end));
        return !before && !after;
    }

    private static boolean isWordChar(int codePoint) {
        return Character.isLetterOrDigit(codePoint) || codePoint == '_';
    }

    private String normalize(String text) {
        for (String n : normalizers) {
            switch (n) {
                case "NFC": text = Normalizer.normalize(text, Normalizer.Form.NFC); break;
                case "NFD": text = Normalizer.normalize(text, Normalizer.Form.NFD); break;
                case "NFKC": text = Normalizer.normalize(text, Normalizer.Form.NFKC); break;
                case "NFKD": text = Normalizer.normalize(text, Normalizer.Form.NFKD); break;
                default: text = text.toLowerCase(java.util.Locale.ROOT); break;
            }
        }
        return text;
    }

    /** The pre-tokenizers in order; the result is byte-level strings ready for BPE. */
    private List<String> preTokenize(String text) {
        List<String> pieces = new ArrayList<>();
        pieces.add(text);
        for (PreTokenizer p : preTokenizers) {
            List<String> next = new ArrayList<>();
            for (String piece : pieces) {
                if (p.byteLevel) {
                    String s = p.addPrefixSpace && !piece.startsWith(" ") ? " " + piece : piece;
                    for (String part : p.pattern == null ? java.util.Collections.singletonList(s) : split(s, p.pattern, "Isolated", false)) {
                        next.add(ByteLevel.encode(part));
                    }
                } else {
                    next.addAll(split(piece, p.pattern, p.behavior, p.invert));
                }
            }
            pieces = next;
        }
        return pieces;
    }

    static List<String> split(String text, Pattern pattern, String behavior, boolean invert) {
        List<int[]> spans = new ArrayList<>(); // {start, end, isDelimiter}
        Matcher m = pattern.matcher(text);
        int last = 0;
        while (m.find()) {
            if (m.end() == m.start()) continue;
            if (m.start() > last) spans.add(new int[] {last, m.start(), invert ? 1 : 0});
            spans.add(new int[] {m.start(), m.end(), invert ? 0 : 1});
            last = m.end();
        }
        if (last < text.length()) spans.add(new int[] {last, text.length(), invert ? 1 : 0});
        List<String> out = new ArrayList<>();
        switch (behavior) {
            case "Removed":
                for (int[] s : spans) if (s[2] == 0) out.add(text.substring(s[0], s[1]));
                break;
            case "Isolated":
                for (int[] s : spans) out.add(text.substring(s[0], s[1]));
                break;
            case "MergedWithPrevious": {
                StringBuilder current = null;
                for (int[] s : spans) {
                    if (s[2] == 1 && current != null) {
                        current.append(text, s[0], s[1]);
                    } else {
                        if (current != null) out.add(current.toString());
                        current = new StringBuilder(text.substring(s[0], s[1]));
                    }
                }
                if (current != null) out.add(current.toString());
                break;
            }
            case "MergedWithNext": {
                StringBuilder pending = new StringBuilder();
                for (int[] s : spans) {
                    pending.append(text, s[0], s[1]);
                    if (s[2] == 0) {
                        out.add(pending.toString());
                        pending.setLength(0);
                    }
                }
                if (pending.length() > 0) out.add(pending.toString());
                break;
            }
            default: { // Contiguous: runs of delimiters merge
                StringBuilder current = null;
                int previousKind = -1;
                for (int[] s : spans) {
                    if (current != null && s[2] == 1 && previousKind == 1) {
                        current.append(text, s[0], s[1]);
                    } else {
                        if (current != null) out.add(current.toString());
                        current = new StringBuilder(text.substring(s[0], s[1]));
                    }
                    previousKind = s[2];
                }
                if (current != null) out.add(current.toString());
            }
        }
        out.removeIf(String::isEmpty);
        return out;
    }

    private static long pairKey(int a, int b) {
        return ((long) a << 32) | (b & 0xFFFFFFFFL);
    }

    /** BPE over one pre-token: merges applied lowest rank first, leftmost first among equal ranks. */
    int[] bpe(String word) {
        int[] cached = cache.get(word);
        if (cached != null) return cached;
        int[] result = merge(word);
        cache.put(word, result);
        return result;
    }

    private int[] merge(String word) {
        if (ignoreMerges) {
            Integer whole = vocab.get(word);
            if (whole != null) return new int[] {whole};
        }
        int n = word.length();
        int[] ids = new int[n];
        int count = 0;
        for (int k = 0; k < n; ) { // the byte-level alphabet is BMP, but stay correct for any code point
            int cp = word.codePointAt(k);
            Integer id = vocab.get(new String(Character.toChars(cp)));
            k += Character.charCount(cp);
            if (id != null) ids[count++] = id; // no unk token: an unknown symbol is dropped, as tokenizers does
        }
        int[] prev = new int[count], next = new int[count];
        boolean[] gone = new boolean[count];
        for (int k = 0; k < count; k++) {
            prev[k] = k - 1;
            next[k] = k + 1 < count ? k + 1 : -1;
        }
        // queue entries: rank << 32 | position; ties on rank pop the leftmost first
        PriorityQueue<Long> queue = new PriorityQueue<>();
        for (int k = 0; k + 1 < count; k++) {
            long[] m = merges.get(pairKey(ids[k], ids[k + 1]));
            if (m != null) queue.add((m[0] << 32) | k);
        }
        while (!queue.isEmpty()) {
            long top = queue.poll();
            int pos = (int) (top & 0xFFFFFFFFL);
            int rank = (int) (top >>> 32);
            if (gone[pos] || next[pos] < 0) continue;
            int right = next[pos];
            long[] m = merges.get(pairKey(ids[pos], ids[right]));
            if (m == null || m[0] != rank) continue; // stale: a neighbour changed since it was queued
            ids[pos] = (int) m[1];
            gone[right] = true;
            next[pos] = next[right];
            if (next[pos] >= 0) prev[next[pos]] = pos;
            if (prev[pos] >= 0) {
                long[] left = merges.get(pairKey(ids[prev[pos]], ids[pos]));
                if (left != null) queue.add((left[0] << 32) | prev[pos]);
            }
            if (next[pos] >= 0) {
                long[] after = merges.get(pairKey(ids[pos], ids[next[pos]]));
                if (after != null) queue.add((after[0] << 32) | pos);
            }
        }
        int[] out = new int[count];
        int size = 0;
        for (int k = 0; k < count; k++) if (!gone[k]) out[size++] = ids[k];
        return java.util.Arrays.copyOf(out, size);
    }

    // ---- decoding ---------------------------------------------------------------------------------

    /** Text for ids (special tokens kept unless {@code skipSpecial}), as tokenizers' decode gives it. */
    public String decode(int[] ids, boolean skipSpecial) {
        ByteArrayOutputStream bytes = new ByteArrayOutputStream();
        for (int id : ids) {
            if (skipSpecial && isSpecial(id)) continue;
            byte[] b = tokenBytes(id);
            bytes.write(b, 0, b.length);
        }
        byte[] all = bytes.toByteArray();
        return Utf8.decodeLossy(all, all.length);
    }

    /** A token's bytes (empty for an unknown id). */
    public byte[] tokenBytes(int id) {
        String token = id >= 0 && id < idToToken.length ? idToToken[id] : null;
        return token == null ? new byte[0] : ByteLevel.decode(token);
    }

    public boolean isSpecial(int id) {
        AddedToken token = addedById.get(id);
        return token != null && token.special;
    }

    /** The id of a token's text (a vocabulary entry in byte-level form, or an added token's content). */
    public Integer tokenId(String token) {
        for (AddedToken a : added) if (a.content.equals(token)) return a.id;
        return vocab.get(token);
    }

    public int size() {
        return idToToken.length;
    }

    /**
     * Text from a stream of token ids, released as soon as it is whole: a character split across
     * tokens is held back until its last byte arrives.
     */
    public final class TextStream {
        private byte[] pending = new byte[16];
        private int length;
        private final boolean skipSpecial;

        public TextStream(boolean skipSpecial) {
            this.skipSpecial = skipSpecial;
        }

        /** The text this token completes (possibly empty). */
        public String push(int id) {
            if (skipSpecial && isSpecial(id)) return "";
            byte[] b = tokenBytes(id);
            if (length + b.length > pending.length) pending = java.util.Arrays.copyOf(pending, 2 * (length + b.length));
            System.arraycopy(b, 0, pending, length, b.length);
            length += b.length;
            int ready = length - Utf8.incompleteTail(pending, length);
            String text = Utf8.decodeLossy(pending, ready);
            System.arraycopy(pending, ready, pending, 0, length - ready);
            length -= ready;
            return text;
        }

        /** Whatever is held back, as replacement characters. */
        public String flush() {
            String text = Utf8.decodeLossy(pending, length);
            length = 0;
            return text;
        }
    }
}
