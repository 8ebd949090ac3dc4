package dev.qwenmobile.core;

import static org.junit.jupiter.api.Assertions.assertEquals;

import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;

/** Sampling.sample, SplitMix64 and LoopGuard against chat_format.py on the same inputs. */
class SamplerGoldenTest {
    @Test
    void splitMix64IsTheReferenceStream() {
        SplitMix64 rng = new SplitMix64(0);
        assertEquals(0xE220A8397B1DCDAFL, rng.nextLong());
        assertEquals(0x6E789E6AA1B965F4L, rng.nextLong());
        assertEquals(0x06C45D188009454FL, rng.nextLong());
    }

    @Test
    void samplesAsPythonDoes() throws Exception {
        for (Object c : TestData.arr(TestData.json("sampler_cases.json"))) {
            Map<String, Object> m = TestData.obj(c);
            float[] logits = TestData.bitsToFloats(m.get("logits_bits"));
            Map<Integer, Integer> counts = new LinkedHashMap<>();
            for (Map.Entry<String, Object> e : TestData.obj(m.get("counts")).entrySet()) {
                counts.put(Integer.parseInt(e.getKey()), ((Json.Num) e.getValue()).intValue());
            }
            Sampling sampling = TestData.sampling(m.get("sampling"));
            SplitMix64 rng = new SplitMix64(Long.parseLong((String) m.get("seed")));
            List<Integer> picks = new ArrayList<>();
            for (int k = 0; k < 8; k++) picks.add(sampling.sample(logits, counts, rng));
            List<Integer> expected = new ArrayList<>();
            for (int p : Json.ints(m.get("picks"), "picks")) expected.add(p);
            assertEquals(expected, picks, m.get("sampling") + " seed " + m.get("seed"));
        }
    }

    @Test
    void loopGuardAgreesWithPython() throws Exception {
        for (Object c : TestData.arr(TestData.json("loop_guard_cases.json"))) {
            Map<String, Object> m = TestData.obj(c);
            LoopGuard guard = LoopGuard.fromJson(TestData.obj(m.get("guard")));
            List<Integer> tokens = new ArrayList<>();
            for (int t : Json.ints(m.get("tokens"), "tokens")) tokens.add(t);
            assertEquals(m.get("looping"), guard.looping(tokens), tokens.toString());
        }
    }
}
