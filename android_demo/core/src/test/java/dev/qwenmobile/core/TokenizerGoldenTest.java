package dev.qwenmobile.core;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/** The Java tokenizer against the Python tokenizers library on the same tokenizer.json files. */
class TokenizerGoldenTest {
    static Tokenizer embedded, qwen35;
    static List<Object> cases, decodeCases;

    @BeforeAll
    static void load() throws Exception {
        embedded = Tokenizer.fromFile(TestData.file("tokenizer.json"));
        qwen35 = Tokenizer.fromFile(TestData.file("tokenizer_qwen35_pattern.json"));
        Map<String, Object> golden = TestData.obj(TestData.json("tokenizer_cases.json"));
        cases = TestData.arr(golden.get("cases"));
        decodeCases = TestData.arr(golden.get("decode"));
        assertTrue(cases.size() > 150, "the corpus is there");
    }

    private static void check(Tokenizer tokenizer, String name) {
        List<String> failures = new ArrayList<>();
        for (Object c : cases) {
            Map<String, Object> m = TestData.obj(c);
            String text = (String) m.get("text");
            int[] expected = Json.ints(m.get(name), name);
            int[] got = tokenizer.encode(text);
            if (!Arrays.equals(expected, got)) {
                failures.add("encode " + escape(text) + "\n  tokenizers: " + Arrays.toString(expected) + "\n  java:       " + Arrays.toString(got));
                continue;
            }
            if (!m.get(name + "_decoded").equals(tokenizer.decode(got, false))) {
                failures.add("decode " + escape(text) + " -> " + escape(tokenizer.decode(got, false)));
            }
            if (!m.get(name + "_decoded_skip").equals(tokenizer.decode(got, true))) {
                failures.add("decode, skipping special tokens: " + escape(text));
            }
        }
        assertTrue(failures.isEmpty(), failures.size() + " of " + cases.size() + " cases differ from tokenizers (" + name + "):\n"
                + String.join("\n", failures.subList(0, Math.min(8, failures.size()))));
    }

    static String escape(String s) {
        StringBuilder out = new StringBuilder("\"");
        s.codePoints().forEach(cp -> {
            if (cp < 0x20 || cp == 0x7f) out.append(String.format("\\x%02x", cp));
            else out.appendCodePoint(cp);
        });
        return out.append('"').toString();
    }

    @Test
    void embeddedTokenizerMatchesTokenizers() {
        check(embedded, "embedded");
    }

    @Test
    void qwen35PreTokenizerMatchesTokenizers() {
        check(qwen35, "qwen35");
    }

    @Test
    void decodingArbitraryIdsMatchesTokenizers() {
        for (Object c : decodeCases) {
            Map<String, Object> m = TestData.obj(c);
            int[] ids = Json.ints(m.get("ids"), "ids");
            assertEquals(m.get("qwen35"), qwen35.decode(ids, false), Arrays.toString(ids));
            assertEquals(m.get("qwen35_skip"), qwen35.decode(ids, true), Arrays.toString(ids));
        }
    }

    @Test
    void streamingReleasesWholeCharactersOnly() {
        for (Object c : cases) {
            Map<String, Object> m = TestData.obj(c);
            int[] ids = Json.ints(m.get("qwen35"), "ids");
            Tokenizer.TextStream stream = qwen35.new TextStream(false);
            StringBuilder out = new StringBuilder();
            for (int id : ids) {
                String piece = stream.push(id);
                assertTrue(piece.indexOf('\uFFFD') < 0 || ((String) m.get("text")).indexOf('\uFFFD') >= 0, "a split character leaked");
                out.append(piece);
            }
            out.append(stream.flush());
            assertEquals(m.get("qwen35_decoded"), out.toString());
        }
    }

    @Test
    void addedTokensAreSplitFirst() {
        assertArrayEquals(new int[] {1}, embedded.encode("<|im_start|>"));
        assertEquals(Integer.valueOf(4097), qwen35.tokenId("</think>"));
        assertTrue(qwen35.isSpecial(2) && !qwen35.isSpecial(4096));
        assertEquals("<think>x", qwen35.decode(qwen35.encode("<think>x<|im_end|>"), true));
    }

    @Test
    void refusesWhatItDoesNotImplement() {
        String unigram = "{\"model\": {\"type\": \"Unigram\", \"vocab\": []}}";
        assertThrows(IllegalArgumentException.class, () -> Tokenizer.fromJson(unigram));
        String metaspace = "{\"pre_tokenizer\": {\"type\": \"Metaspace\"}, \"model\": {\"type\": \"BPE\", \"vocab\": {}, \"merges\": []}}";
        assertThrows(IllegalArgumentException.class, () -> Tokenizer.fromJson(metaspace));
    }

    @Test
    void tokenizeCommandLineEncodesAndDecodes() throws Exception {
        Map<String, Object> m = TestData.obj(cases.get(9));
        String text = (String) m.get("text");
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        int rc = Tokenize.run(new String[] {TestData.file("tokenizer.json").toString()},
                new ByteArrayInputStream(text.getBytes(StandardCharsets.UTF_8)), new PrintStream(out), System.err);
        assertEquals(0, rc);
        StringBuilder expected = new StringBuilder();
        for (int id : Json.ints(m.get("embedded"), "ids")) expected.append(expected.length() > 0 ? " " : "").append(id);
        assertEquals(expected + System.lineSeparator(), out.toString(StandardCharsets.UTF_8));
        ByteArrayOutputStream decoded = new ByteArrayOutputStream();
        rc = Tokenize.run(new String[] {TestData.file("tokenizer.json").toString(), "--decode"},
                new ByteArrayInputStream(expected.toString().getBytes(StandardCharsets.UTF_8)), new PrintStream(decoded), System.err);
        assertEquals(0, rc);
        assertEquals(m.get("embedded_decoded"), decoded.toString(StandardCharsets.UTF_8));
    }
}
