package dev.qwenmobile.core;

import java.util.List;
import java.util.Map;

/**
 * Stops a reply that repeats itself: for some period p in 1..maxPeriod, its last
 * max(minSpan, (minRepeats - 1) * p) tokens each equal the token p before them
 * (qwen_mobile.chat_format.LoopGuard; the manifest's generation.loop_guard).
 */
public final class LoopGuard {
    public final int maxPeriod, minSpan, minRepeats;

    public LoopGuard(int maxPeriod, int minSpan, int minRepeats) {
        this.maxPeriod = maxPeriod;
        this.minSpan = minSpan;
        this.minRepeats = minRepeats;
    }

    public static LoopGuard defaults() {
        return new LoopGuard(64, 64, 4);
    }

    public static LoopGuard fromJson(Map<String, Object> m) {
        return new LoopGuard(Json.num(m.get("max_period"), "loop_guard.max_period").intValue(),
                Json.num(m.get("min_span"), "loop_guard.min_span").intValue(),
                Json.num(m.get("min_repeats"), "loop_guard.min_repeats").intValue());
    }

    public boolean looping(List<Integer> tokens) {
        int n = tokens.size();
        for (int period = 1; period <= maxPeriod; period++) {
            int need = Math.max(minSpan, (minRepeats - 1) * period);
            if (need + period > n) break;
            boolean repeating = true;
            for (int j = 0; j < need && repeating; j++) {
                repeating = tokens.get(n - 1 - j).intValue() == tokens.get(n - 1 - j - period).intValue();
            }
            if (repeating) return true;
        }
        return false;
    }
}
