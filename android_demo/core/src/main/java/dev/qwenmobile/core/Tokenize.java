package dev.qwenmobile.core;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Paths;

/**
 * {@code java -cp CLASSES dev.qwenmobile.core.Tokenize TOKENIZER_JSON [--decode] [--skip-special]}
 *
 * <p>Encodes UTF-8 text read from stdin (all of it, as is: a trailing newline is part of the text) and
 * prints the ids space-separated on one line; with {@code --decode}, reads whitespace-separated ids and
 * prints their text (no newline added).
 */
public final class Tokenize {
    private Tokenize() {}

    public static void main(String[] args) throws IOException {
        System.exit(run(args, System.in, System.out, System.err));
    }

    static int run(String[] args, InputStream in, PrintStream out, PrintStream err) throws IOException {
        String path = null;
        boolean decode = false, skipSpecial = false;
        for (String arg : args) {
            if (arg.equals("--decode")) {
                decode = true;
            } else if (arg.equals("--skip-special")) {
                skipSpecial = true;
            } else if (path == null && !arg.startsWith("--")) {
                path = arg;
            } else {
                err.println("usage: Tokenize TOKENIZER_JSON [--decode] [--skip-special]  (text or ids on stdin)");
                return 2;
            }
        }
        if (path == null) {
            err.println("usage: Tokenize TOKENIZER_JSON [--decode] [--skip-special]  (text or ids on stdin)");
            return 2;
        }
        Tokenizer tokenizer;
        try {
            tokenizer = Tokenizer.fromFile(Paths.get(path));
        } catch (IOException | RuntimeException e) {
            err.println(path + ": " + e.getMessage());
            return 2;
        }
        ByteArrayOutputStream buffer = new ByteArrayOutputStream();
        byte[] block = new byte[1 << 16];
        for (int n; (n = in.read(block)) > 0; ) buffer.write(block, 0, n);
        String input = new String(buffer.toByteArray(), StandardCharsets.UTF_8);
        PrintStream utf8 = new PrintStream(out, true, "UTF-8");
        if (decode) {
            String trimmed = input.trim();
            String[] parts = trimmed.isEmpty() ? new String[0] : trimmed.split("\\s+");
            int[] ids = new int[parts.length];
            try {
                for (int k = 0; k < parts.length; k++) ids[k] = Integer.parseInt(parts[k]);
            } catch (NumberFormatException e) {
                err.println("--decode: not an id: " + e.getMessage());
                return 2;
            }
            utf8.print(tokenizer.decode(ids, skipSpecial));
        } else {
            StringBuilder line = new StringBuilder();
            for (int id : tokenizer.encode(input)) {
                if (line.length() > 0) line.append(' ');
                line.append(id);
            }
            utf8.println(line);
        }
        utf8.flush();
        return 0;
    }
}
