package dev.qwenmobile.core;

/** GPT-2's byte-level alphabet: each byte as one printable character, as tokenizers' ByteLevel uses it. */
final class ByteLevel {
    static final char[] BYTE_TO_CHAR = new char[256];
    static final int[] CHAR_TO_BYTE = new int[324];

    /** GPT-2's regex, the one ByteLevel applies when use_regex is true. */
    static final String GPT2_PATTERN =
            "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

    static {
        java.util.Arrays.fill(CHAR_TO_BYTE, -1);
        int extra = 0;
        for (int b = 0; b < 256; b++) {
            boolean printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            char c = printable ? (char) b : (char) (256 + extra++);
            BYTE_TO_CHAR[b] = c;
            CHAR_TO_BYTE[c] = b;
        }
    }

    private ByteLevel() {}

    /** The UTF-8 bytes of {@code text}, each as its byte-level character. */
    static String encode(String text) {
        byte[] bytes = text.getBytes(java.nio.charset.StandardCharsets.UTF_8);
        char[] out = new char[bytes.length];
        for (int k = 0; k < bytes.length; k++) out[k] = BYTE_TO_CHAR[bytes[k] & 0xFF];
        return new String(out);
    }

    /** A token's bytes; a token with a character outside the alphabet (an added token) is its own UTF-8. */
    static byte[] decode(String token) {
        byte[] out = new byte[token.length()];
        for (int k = 0; k < token.length(); k++) {
            char c = token.charAt(k);
            int b = c < CHAR_TO_BYTE.length ? CHAR_TO_BYTE[c] : -1;
            if (b < 0) return token.getBytes(java.nio.charset.StandardCharsets.UTF_8);
            out[k] = (byte) b;
        }
        return out;
    }
}
