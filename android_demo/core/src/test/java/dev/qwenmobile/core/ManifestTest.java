package dev.qwenmobile.core;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Map;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.io.TempDir;

/** Manifests as the export writes them (format_version 2), and the bundle's digests. */
class ManifestTest {
    static final String ABC_SHA256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    static String golden(String name) throws Exception {
        return Files.readString(TestData.file(name), StandardCharsets.UTF_8);
    }

    @Test
    void readsAnExecuTorchManifest() throws Exception {
        Manifest m = Manifest.parse(golden("manifest.json"));
        assertEquals("executorch", m.backend);
        assertEquals("model.pte", m.artifact);
        assertEquals(4096, m.vocabSize);
        assertEquals(128, m.maxSeqLen);
        assertEquals(Integer.valueOf(1), m.bos);
        assertEquals(2, m.eos[0]);
        assertNotNull(m.chatFormat);
        assertEquals("<|im_start|>assistant\n", m.chatFormat.generationPrompt(null));
        assertEquals(0.0, m.generation.sampling(null, m.chatFormat).temperature, "the embedded model's generation_config is greedy");
        assertEquals("int64", m.methods.get("forward").input("tokens").dtype);
        assertTrue(m.files.containsKey("model.pte") && m.files.containsKey("tokenizer.json"));
    }

    @Test
    void readsATfliteManifestWithItsStateFeeds() throws Exception {
        Manifest m = Manifest.parse(golden("manifest_tflite.json"));
        assertEquals("tflite", m.backend);
        assertEquals(m.stateFeeds.size(), m.methods.get("decode").outputs.size() - 1, "every output but logits feeds state");
        for (Map.Entry<String, String> feed : m.stateFeeds.entrySet()) {
            long[] in = m.methods.get("decode").input(feed.getValue()).fixedShape();
            long[] out = m.methods.get("decode").output(feed.getKey()).fixedShape();
            assertEquals(java.util.Arrays.toString(in), java.util.Arrays.toString(out), feed.getKey());
        }
        assertEquals("int32", m.methods.get("prefill").input("length").dtype);
    }

    @Test
    void verifiesSizesAndDigestsNamingTheFileThatDiffers(@TempDir Path bundle) throws Exception {
        Manifest golden = Manifest.parse(golden("manifest.json"));
        Manifest.FileEntry tok = golden.files.get("tokenizer.json");
        // the digest Python's hashlib wrote for the real tokenizer.json, checked by Java's SHA-256
        String json = "{\"format_version\": 2, \"backend\": \"executorch\", \"artifact\": \"model.pte\", \"vocab_size\": 4096,"
                + " \"max_context\": 2048, \"max_seq_len\": 128, \"special_tokens\": {\"bos\": null, \"eos\": [2]},"
                + " \"chat_template\": null, \"chat_format\": null, \"quant\": {\"scheme\": \"fp32\"}, \"parity\": {\"passed\": true},"
                + " \"generation\": " + GENERATION + ","
                + " \"files\": {\"model.pte\": {\"bytes\": 3, \"sha256\": \"" + ABC_SHA256 + "\"},"
                + " \"tokenizer.json\": {\"bytes\": " + tok.bytes + ", \"sha256\": \"" + tok.sha256 + "\"}},"
                + " \"methods\": {\"forward\": {\"inputs\": [{\"name\": \"tokens\", \"dtype\": \"int64\", \"shape\": [1, \"seq_len\"]},"
                + " {\"name\": \"input_pos\", \"dtype\": \"int64\", \"shape\": [1]}],"
                + " \"outputs\": [{\"name\": \"logits\", \"dtype\": \"float32\", \"shape\": [1, 4096]}]}}}";
        Manifest m = Manifest.parse(json);
        assertNull(m.chatFormat);
        Files.writeString(bundle.resolve("model.pte"), "abc");
        Files.copy(TestData.file("tokenizer.json"), bundle.resolve("tokenizer.json"));
        m.verifyFiles(bundle, null);

        byte[] bytes = Files.readAllBytes(bundle.resolve("tokenizer.json"));
        bytes[bytes.length / 2] ^= 1;
        Files.write(bundle.resolve("tokenizer.json"), bytes);
        Manifest.BundleException changed = assertThrows(Manifest.BundleException.class, () -> m.verifyFiles(bundle, null));
        assertTrue(changed.getMessage().startsWith("tokenizer.json: SHA-256"), changed.getMessage());

        Files.writeString(bundle.resolve("model.pte"), "ab");
        Manifest.BundleException shorter = assertThrows(Manifest.BundleException.class, () -> m.verifyFiles(bundle, null));
        assertTrue(shorter.getMessage().startsWith("model.pte: 2 bytes, the manifest says 3"), shorter.getMessage());

        Files.delete(bundle.resolve("model.pte"));
        Manifest.BundleException missing = assertThrows(Manifest.BundleException.class, () -> m.verifyFiles(bundle, null));
        assertEquals("model.pte: missing from the bundle", missing.getMessage());
    }

    static final String GENERATION = "{\"default_mode\": \"non_thinking\", \"modes\": {\"non_thinking\": {\"temperature\": 0.7,"
            + " \"top_p\": 0.8, \"top_k\": 20, \"min_p\": 0, \"presence_penalty\": 1.5, \"frequency_penalty\": 0,"
            + " \"repetition_penalty\": 1}}, \"max_new_tokens\": 512, \"loop_guard\": {\"max_period\": 64, \"min_span\": 64,"
            + " \"min_repeats\": 4}}";

    @Test
    void refusesManifestsItCannotRun() throws Exception {
        String good = golden("manifest.json");
        String[][] breakages = {
                {"\"format_version\": 2", "\"format_version\": 1", "format_version 1"},
                {"\"artifact\": \"model.pte\"", "\"artifact\": \"../model.pte\"", "not a plain name"},
                {"\"backend\": \"executorch\"", "\"backend\": \"onnx\"", "backend onnx"},
                {"\"passed\": true", "\"passed\": false", "parity.passed is false"},
                {"\"max_seq_len\": 128", "\"max_seq_len\": 4096", "exceeds max_context"},
        };
        for (String[] b : breakages) {
            assertTrue(good.contains(b[0]), b[0]);
            Manifest.BundleException e = assertThrows(Manifest.BundleException.class, () -> Manifest.parse(good.replace(b[0], b[1])));
            assertTrue(e.getMessage().contains(b[2]), e.getMessage());
        }
        String tflite = golden("manifest_tflite.json");
        String broken = tflite.replace("\"layer0_conv_state_out\": \"layer0_conv_state\"", "\"layer0_conv_state_out\": \"layer0_conv\"");
        Manifest.BundleException e = assertThrows(Manifest.BundleException.class, () -> Manifest.parse(broken));
        assertTrue(e.getMessage().contains("layer0_conv"), e.getMessage());
    }
}
