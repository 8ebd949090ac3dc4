package dev.qwenmobile.core;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.Map;

/** The golden files scripts/app_goldens.py wrote (testdata/goldens, or -Dqwenmobile.testdata=DIR). */
final class TestData {
    private TestData() {}

    static Path dir() {
        Path dir = Path.of(System.getProperty("qwenmobile.testdata", "testdata")).resolve("goldens");
        if (!Files.isDirectory(dir)) throw new IllegalStateException(dir.toAbsolutePath() + ": golden files not found");
        return dir;
    }

    static Path file(String name) {
        return dir().resolve(name);
    }

    static Object json(String name) throws IOException {
        return Json.parse(file(name));
    }

    static Map<String, Object> obj(Object value) {
        return Json.obj(value, "golden");
    }

    static List<Object> arr(Object value) {
        return Json.arr(value, "golden");
    }

    static float[] bitsToFloats(Object bits) {
        int[] raw = Json.ints(bits, "logits_bits");
        float[] out = new float[raw.length];
        for (int k = 0; k < raw.length; k++) out[k] = Float.intBitsToFloat(raw[k]);
        return out;
    }

    static Boolean optionalBool(Object value) {
        return value == null ? null : (Boolean) value;
    }

    static Sampling sampling(Object value) {
        return Sampling.fromJson(obj(value));
    }
}
