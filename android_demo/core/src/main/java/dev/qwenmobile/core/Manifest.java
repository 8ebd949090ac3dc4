package dev.qwenmobile.core;

import java.io.IOException;
import java.io.InputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * A bundle's manifest.json (format_version 2), read and checked: what the app needs to drive the
 * artifact, and the size and SHA-256 of every file of the bundle.
 */
public final class Manifest {
    public static final int FORMAT_VERSION = 2;
    public static final String FILE = "manifest.json";

    /** A bundle that cannot be used, with a message naming the file or field. */
    public static final class BundleException extends Exception {
        private static final long serialVersionUID = 1L;

        public BundleException(String message) {
            super(message);
        }
    }

    public static final class Tensor {
        public final String name, dtype;
        public final List<Object> shape; // integers, or a string naming a dynamic dimension

        Tensor(Map<String, Object> m, String what) {
            name = Json.str(m.get("name"), what + ".name");
            dtype = Json.str(m.get("dtype"), what + ".dtype");
            shape = Collections.unmodifiableList(Json.arr(m.get("shape"), what + ".shape"));
        }

        /** The shape with every dimension a fixed integer. */
        public long[] fixedShape() throws BundleException {
            long[] out = new long[shape.size()];
            for (int k = 0; k < out.length; k++) {
                if (!(shape.get(k) instanceof Json.Num)) throw new BundleException(name + ": dimension " + k + " is dynamic");
                out[k] = ((Json.Num) shape.get(k)).longValue();
            }
            return out;
        }
    }

    public static final class Method {
        public final List<Tensor> inputs = new ArrayList<>(), outputs = new ArrayList<>();

        public Tensor input(String name) {
            for (Tensor t : inputs) if (t.name.equals(name)) return t;
            return null;
        }

        public Tensor output(String name) {
            for (Tensor t : outputs) if (t.name.equals(name)) return t;
            return null;
        }
    }

    public static final class FileEntry {
        public final long bytes;
        public final String sha256;

        FileEntry(long bytes, String sha256) {
            this.bytes = bytes;
            this.sha256 = sha256;
        }
    }

    public final int formatVersion;
    public final String backend, artifact, quantScheme, chatTemplate;
    public final int vocabSize, maxContext, maxSeqLen;
    public final Integer bos;
    public final int[] eos;
    public final ChatFormat chatFormat; // null: the template could not be expressed as a chat format
    public final Generation generation;
    public final Map<String, FileEntry> files = new LinkedHashMap<>();
    public final Map<String, Method> methods = new LinkedHashMap<>();
    public final Map<String, String> stateFeeds = new LinkedHashMap<>(); // output name -> input it feeds
    public final Map<String, Object> raw;

    public static Manifest read(Path bundle) throws IOException, BundleException {
        Path path = bundle.resolve(FILE);
        if (!Files.isRegularFile(path)) throw new BundleException(path + ": not found (is this a qwen-mobile bundle?)");
        try {
            return new Manifest(Json.obj(Json.parse(path), FILE));
        } catch (Json.JsonException e) {
            throw new BundleException(path + ": " + e.getMessage());
        }
    }

    public static Manifest parse(String json) throws BundleException {
        try {
            return new Manifest(Json.obj(Json.parse(json), FILE));
        } catch (Json.JsonException e) {
            throw new BundleException(FILE + ": " + e.getMessage());
        }
    }

    private Manifest(Map<String, Object> m) throws BundleException {
        raw = m;
        Object version = m.get("format_version");
        formatVersion = version instanceof Json.Num ? ((Json.Num) version).intValue() : -1;
        if (formatVersion != FORMAT_VERSION) {
            throw new BundleException(FILE + ": format_version " + version + "; this app reads format_version "
                    + FORMAT_VERSION + " (re-export the bundle with a qwen-mobile that writes it)");
        }
        backend = Json.str(m.get("backend"), "backend");
        artifact = Json.str(m.get("artifact"), "artifact");
        if (artifact.isEmpty() || artifact.contains("/") || artifact.contains("\\") || artifact.startsWith(".")) {
            throw new BundleException(FILE + ": artifact " + artifact + " is not a plain name inside the bundle");
        }
        vocabSize = positive(m, "vocab_size");
        maxContext = positive(m, "max_context");
        maxSeqLen = positive(m, "max_seq_len");
        if (maxSeqLen > maxContext) throw new BundleException(FILE + ": max_seq_len " + maxSeqLen + " exceeds max_context " + maxContext);
        Map<String, Object> special = Json.field(m, "special_tokens", "manifest");
        bos = special.get("bos") == null ? null : Json.num(special.get("bos"), "special_tokens.bos").intValue();
        eos = Json.ints(special.get("eos"), "special_tokens.eos");
        if (eos.length == 0) throw new BundleException(FILE + ": special_tokens.eos is empty");
        chatTemplate = m.get("chat_template") instanceof String ? (String) m.get("chat_template") : null;
        chatFormat = m.get("chat_format") == null ? null : new ChatFormat(Json.obj(m.get("chat_format"), "chat_format"));
        generation = new Generation(Json.field(m, "generation", "manifest"));
        quantScheme = Json.str(Json.field(m, "quant", "manifest").get("scheme"), "quant.scheme");
        if (!Json.bool(Json.field(m, "parity", "manifest").get("passed"), "parity.passed")) {
            throw new BundleException(FILE + ": parity.passed is false: the artifact did not match the reference at export");
        }
        for (Map.Entry<String, Object> e : Json.field(m, "files", "manifest").entrySet()) {
            String name = e.getKey();
            if (name.isEmpty() || name.startsWith("/") || name.contains("\\") || java.util.Arrays.asList(name.split("/")).contains("..")
                    || name.equals(FILE)) {
                throw new BundleException(FILE + ": files: " + name + " is not a relative path inside the bundle");
            }
            Map<String, Object> f = Json.obj(e.getValue(), "files." + name);
            String sha = Json.str(f.get("sha256"), "files." + name + ".sha256");
            if (!sha.matches("[0-9a-f]{64}")) throw new BundleException(FILE + ": files." + name + ".sha256 is not a SHA-256 hex digest");
            files.put(name, new FileEntry(Json.num(f.get("bytes"), "files." + name + ".bytes").longValue(), sha));
        }
        boolean artifactListed = files.containsKey(artifact);
        for (String name : files.keySet()) artifactListed |= name.startsWith(artifact + "/");
        if (!artifactListed) throw new BundleException(FILE + ": files does not list the artifact " + artifact);
        for (String needed : new String[] {"tokenizer.json"}) {
            if (!files.containsKey(needed)) throw new BundleException(FILE + ": files does not list " + needed);
        }
        for (Map.Entry<String, Object> e : Json.field(m, "methods", "manifest").entrySet()) {
            Map<String, Object> method = Json.obj(e.getValue(), "methods." + e.getKey());
            Method parsed = new Method();
            for (Object t : Json.arr(method.get("inputs"), "methods." + e.getKey() + ".inputs")) {
                parsed.inputs.add(new Tensor(Json.obj(t, "input"), "methods." + e.getKey() + ".inputs"));
            }
            for (Object t : Json.arr(method.get("outputs"), "methods." + e.getKey() + ".outputs")) {
                Map<String, Object> out = Json.obj(t, "output");
                if (out.containsKey("name")) parsed.outputs.add(new Tensor(out, "methods." + e.getKey() + ".outputs"));
            }
            methods.put(e.getKey(), parsed);
        }
        if (m.get("state_feeds") != null) {
            for (Map.Entry<String, Object> e : Json.obj(m.get("state_feeds"), "state_feeds").entrySet()) {
                stateFeeds.put(e.getKey(), Json.str(e.getValue(), "state_feeds." + e.getKey()));
            }
        }
        checkBackend();
    }

    private static int positive(Map<String, Object> m, String key) throws BundleException {
        if (!(m.get(key) instanceof Json.Num)) throw new BundleException(FILE + ": " + key + " is missing or not a number");
        int value = ((Json.Num) m.get(key)).intValue();
        if (value < 1) throw new BundleException(FILE + ": " + key + " must be at least 1");
        return value;
    }

    private void checkBackend() throws BundleException {
        switch (backend) {
            case "executorch":
                requireMethod("forward", new String[] {"tokens", "input_pos"});
                break;
            case "tflite": {
                requireMethod("prefill", new String[] {"tokens", "input_pos", "length"});
                requireMethod("decode", new String[] {"tokens", "input_pos"});
                if (stateFeeds.isEmpty()) throw new BundleException(FILE + ": a tflite bundle needs state_feeds");
                for (String method : new String[] {"prefill", "decode"}) {
                    Method sig = methods.get(method);
                    for (Map.Entry<String, String> feed : stateFeeds.entrySet()) {
                        if (sig.output(feed.getKey()) == null) {
                            throw new BundleException(FILE + ": state_feeds output " + feed.getKey() + " is not an output of " + method);
                        }
                        if (sig.input(feed.getValue()) == null) {
                            throw new BundleException(FILE + ": state_feeds input " + feed.getValue() + " is not an input of " + method);
                        }
                    }
                    for (Tensor input : sig.inputs) {
                        boolean known = java.util.Arrays.asList("tokens", "input_pos", "length").contains(input.name)
                                || stateFeeds.containsValue(input.name);
                        if (!known) throw new BundleException(FILE + ": " + method + " input " + input.name + " is fed by nothing");
                    }
                }
                break;
            }
            case "coreml":
                requireMethod("prefill", new String[] {"tokens", "input_pos", "length"});
                requireMethod("decode", new String[] {"tokens", "input_pos"});
                break;
            default:
                throw new BundleException(FILE + ": backend " + backend + " is not one this app runs (executorch, tflite, coreml)");
        }
    }

    private void requireMethod(String name, String[] inputs) throws BundleException {
        Method method = methods.get(name);
        if (method == null) throw new BundleException(FILE + ": methods has no " + name + " (the " + backend + " artifact needs it)");
        for (String input : inputs) {
            if (method.input(input) == null) throw new BundleException(FILE + ": methods." + name + " has no input " + input);
        }
        if (method.output("logits") == null) throw new BundleException(FILE + ": methods." + name + " has no output logits");
    }

    /** Progress while hashing: bytes done of the total. */
    public interface Progress {
        void update(long done, long total);
    }

    /**
     * Checks every file the manifest lists: present, of its size, with its SHA-256. Throws naming
     * the first file that differs.
     */
    public void verifyFiles(Path bundle, Progress progress) throws IOException, BundleException {
        long total = 0, done = 0;
        for (FileEntry f : files.values()) total += f.bytes;
        for (Map.Entry<String, FileEntry> e : files.entrySet()) {
            Path path = bundle.resolve(e.getKey());
            if (!Files.isRegularFile(path)) throw new BundleException(e.getKey() + ": missing from the bundle");
            long size = Files.size(path);
            if (size != e.getValue().bytes) {
                throw new BundleException(e.getKey() + ": " + size + " bytes, the manifest says " + e.getValue().bytes
                        + " (incomplete copy?)");
            }
            String digest = sha256(path, done, total, progress);
            if (!digest.equals(e.getValue().sha256)) {
                throw new BundleException(e.getKey() + ": SHA-256 " + digest.substring(0, 12) + "… differs from the manifest's "
                        + e.getValue().sha256.substring(0, 12) + "… (the file was changed or corrupted)");
            }
            done += size;
        }
    }

    public static String sha256(Path path, long done, long total, Progress progress) throws IOException {
        MessageDigest digest;
        try {
            digest = MessageDigest.getInstance("SHA-256");
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
        byte[] buffer = new byte[1 << 20];
        try (InputStream in = Files.newInputStream(path)) {
            int n;
            while ((n = in.read(buffer)) > 0) {
                digest.update(buffer, 0, n);
                done += n;
                if (progress != null) progress.update(done, total);
            }
        }
        StringBuilder hex = new StringBuilder(64);
        for (byte b : digest.digest()) hex.append(String.format("%02x", b));
        return hex.toString();
    }

    /** The bundle's tokenizer, loaded. */
    public Tokenizer tokenizer(Path bundle) throws IOException {
        return Tokenizer.fromFile(bundle.resolve("tokenizer.json"));
    }
}
