package dev.qwenmobile.core;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;

/**
 * Logits that depend on every token fed so far (a hash of the history); after {@code replyLength}
 * tokens past the last {@code <|im_start|>} and its {@code promptTail}, the top token is
 * {@code stop}. It checks positions continue its state, records calls, and can copy its state.
 */
final class ScriptedEngine implements Engine {
    final int vocab, maxContext, maxChunk, replyLength, promptTail, stop;
    final boolean snapshots;
    List<Integer> history = new ArrayList<>();
    final List<int[]> calls = new ArrayList<>(); // {start, tokens...}

    ScriptedEngine(int maxContext, int maxChunk, int replyLength, int promptTail, int stop, boolean snapshots) {
        this.vocab = 4096;
        this.maxContext = maxContext;
        this.maxChunk = maxChunk;
        this.replyLength = replyLength;
        this.promptTail = promptTail;
        this.stop = stop;
        this.snapshots = snapshots;
    }

    @Override public int maxContext() {
        return maxContext;
    }

    @Override public int maxChunk() {
        return maxChunk;
    }

    @Override public float[] step(int[] tokens, int start) {
        if (tokens.length < 1 || tokens.length > maxChunk || start + tokens.length > maxContext) {
            throw new AssertionError(tokens.length + " tokens at " + start + " do not fit");
        }
        if (start == 0) history = new ArrayList<>();
        if (start != history.size()) throw new AssertionError("fed at " + start + ", the state holds " + history.size());
        int[] call = new int[tokens.length + 1];
        call[0] = start;
        System.arraycopy(tokens, 0, call, 1, tokens.length);
        calls.add(call);
        for (int t : tokens) history.add(t);
        long h = 1125899906842597L;
        for (int t : history) h = 31 * h + t;
        SplitMix64 rng = new SplitMix64(h);
        float[] logits = new float[vocab];
        for (int k = 0; k < vocab; k++) logits[k] = (float) (rng.nextDouble() * 4);
        logits[0] = logits[1] = logits[2] = -10;
        int lastStart = history.lastIndexOf(1);
        if (history.size() - 1 - lastStart >= promptTail + replyLength) logits[stop] = 50;
        return logits;
    }

    @Override public boolean canSnapshot() {
        return snapshots;
    }

    @Override public Object snapshot() {
        return new ArrayList<>(history);
    }

    @SuppressWarnings("unchecked")
    @Override public void restore(Object snapshot) {
        history = new ArrayList<>((List<Integer>) snapshot);
    }

    int[] call(int index) {
        return Arrays.copyOfRange(calls.get(index), 1, calls.get(index).length);
    }
}
