package dev.qwenmobile.core;

import java.io.ByteArrayOutputStream;

/** UTF-8 the way Rust's {@code String::from_utf8_lossy} (and so the tokenizers library) reads it. */
public final class Utf8 {
    private Utf8() {}

    /**
     * Decodes bytes, replacing each maximal ill-formed subpart with one U+FFFD (Unicode's
     * "substitution of maximal subparts", which from_utf8_lossy follows).
     */
    public static String decodeLossy(byte[] bytes, int length) {
        StringBuilder out = new StringBuilder(length);
        int i = 0;
        while (i < length) {
            int consumed = validLength(bytes, i, length);
            if (consumed > 0) {
                out.appendCodePoint(codePoint(bytes, i, consumed));
                i += consumed;
            } else {
                out.append('\uFFFD');
                i += Math.max(1, -consumed);
            }
        }
        return out.toString();
    }

    public static String decodeLossy(byte[] bytes) {
        return decodeLossy(bytes, bytes.length);
    }

    /**
     * The length of the well-formed sequence at {@code i}, or minus the length of its maximal
     * ill-formed subpart (at least 1), or 0 when the bytes up to {@code end} are a valid but
     * incomplete start of a sequence (see {@link #incompleteTail}).
     */
    static int validLength(byte[] b, int i, int end) {
        int b0 = b[i] & 0xFF;
        if (b0 < 0x80) return 1;
        int need;
        int lo = 0x80, hi = 0xBF;
        if (b0 >= 0xC2 && b0 <= 0xDF) {
            need = 1;
        } else if (b0 >= 0xE0 && b0 <= 0xEF) {
            need = 2;
            if (b0 == 0xE0) lo = 0xA0;
            if (b0 == 0xED) hi = 0x9F;
        } else if (b0 >= 0xF0 && b0 <= 0xF4) {
            need = 3;
            if (b0 == 0xF0) lo = 0x90;
            if (b0 == 0xF4) hi = 0x8F;
        } else {
            return -1;
        }
        for (int k = 1; k <= need; k++) {
            if (i + k >= end) return -k; // truncated: the bytes so far form one maximal subpart
            int bk = b[i + k] & 0xFF;
            int low = k == 1 ? lo : 0x80, high = k == 1 ? hi : 0xBF;
            if (bk < low || bk > high) return -k;
        }
        return need + 1;
    }

    private static int codePoint(byte[] b, int i, int n) {
        int b0 = b[i] & 0xFF;
        if (n == 1) return b0;
        int cp = b0 & (0xFF >> (n + 1));
        for (int k = 1; k < n; k++) cp = (cp << 6) | (b[i + k] & 0x3F);
        return cp;
    }

    /**
     * How many bytes at the end of {@code b[0..length)} begin a sequence that more bytes could
     * still complete (0 to 3). A streaming decoder holds those back.
     */
    public static int incompleteTail(byte[] b, int length) {
        for (int back = 1; back <= Math.min(3, length); back++) {
            int start = length - back;
            int b0 = b[start] & 0xFF;
            if (b0 < 0x80) return 0;
            if (b0 >= 0xC0) {
                int r = validLength(b, start, length);
                return (r < 0 && -r == back) ? back : 0;
            }
        }
        return 0;
    }

    /** Bytes of a string, for tests and the CLI. */
    public static byte[] encode(String text) {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        byte[] bytes = text.getBytes(java.nio.charset.StandardCharsets.UTF_8);
        out.write(bytes, 0, bytes.length);
        return out.toByteArray();
    }
}
