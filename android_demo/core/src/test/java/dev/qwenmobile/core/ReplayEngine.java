package dev.qwenmobile.core;

import java.util.Arrays;
import java.util.List;
import java.util.Map;

/**
 * Replays the logits the Python runner returned on a real bundle, call by call, and asserts it is
 * fed exactly the recorded token ids at the recorded positions.
 */
final class ReplayEngine implements Engine {
    private final List<Object> calls;
    private final int vocab, maxContext, maxChunk;
    int next;

    ReplayEngine(List<Object> calls, int vocab, int maxContext, int maxChunk) {
        this.calls = calls;
        this.vocab = vocab;
        this.maxContext = maxContext;
        this.maxChunk = maxChunk;
    }

    @Override public int maxContext() {
        return maxContext;
    }

    @Override public int maxChunk() {
        return maxChunk;
    }

    @Override public float[] step(int[] tokens, int start) {
        if (next >= calls.size()) throw new AssertionError("call " + next + " was never recorded: " + Arrays.toString(tokens) + " at " + start);
        Map<String, Object> call = TestData.obj(calls.get(next));
        int[] expected = Json.ints(call.get("tokens"), "tokens");
        int expectedStart = Json.num(call.get("start"), "start").intValue();
        if (!Arrays.equals(expected, tokens) || expectedStart != start) {
            throw new AssertionError("call " + next + ": fed " + Arrays.toString(tokens) + " at " + start + ", recorded "
                    + Arrays.toString(expected) + " at " + expectedStart);
        }
        next++;
        float[] logits = new float[vocab];
        Arrays.fill(logits, Float.NEGATIVE_INFINITY);
        int[] ids = Json.ints(call.get("ids"), "ids");
        float[] values = TestData.bitsToFloats(call.get("logits_bits"));
        for (int k = 0; k < ids.length; k++) logits[ids[k]] = values[k];
        return logits;
    }

    boolean finished() {
        return next == calls.size();
    }
}
