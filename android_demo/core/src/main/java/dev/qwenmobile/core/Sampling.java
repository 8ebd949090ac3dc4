package dev.qwenmobile.core;

import java.util.Map;

/**
 * Sampling parameters and the sampler, exactly as qwen_mobile.chat_format.sample defines them, so
 * that the same logits and seed give the same token in Python, Java and Swift: penalties over the
 * current reply's tokens (repetition: logit / p if positive else * p; presence; frequency * count),
 * greedy at temperature 0 (lowest index on ties), else logits / temperature, top-k by (logit desc,
 * index asc), weights exp(z - max), top-p, min-p, one draw.
 */
public final class Sampling {
    public final double temperature, topP, minP, presencePenalty, frequencyPenalty, repetitionPenalty;
    public final int topK;

    public Sampling(double temperature, double topP, int topK, double minP, double presencePenalty,
                    double frequencyPenalty, double repetitionPenalty) {
        this.temperature = temperature;
        this.topP = topP;
        this.topK = topK;
        this.minP = minP;
        this.presencePenalty = presencePenalty;
        this.frequencyPenalty = frequencyPenalty;
        this.repetitionPenalty = repetitionPenalty;
    }

    public static Sampling greedy() {
        return new Sampling(0, 1, 0, 0, 0, 0, 1);
    }

    /** A manifest's sampling entry (generation.modes.*); absent fields are neutral. */
    public static Sampling fromJson(Map<String, Object> m) {
        return new Sampling(d(m, "temperature", 0), d(m, "top_p", 1), (int) d(m, "top_k", 0), d(m, "min_p", 0),
                d(m, "presence_penalty", 0), d(m, "frequency_penalty", 0), d(m, "repetition_penalty", 1));
    }

    private static double d(Map<String, Object> m, String key, double fallback) {
        Object v = m.get(key);
        return v == null ? fallback : Json.num(v, "sampling." + key).doubleValue();
    }

    public Sampling withTemperature(double t) {
        return new Sampling(t, topP, topK, minP, presencePenalty, frequencyPenalty, repetitionPenalty);
    }

    /** One token from {@code logits}; {@code counts} maps each token of the current reply to its count. */
    public int sample(float[] logits, Map<Integer, Integer> counts, SplitMix64 rng) {
        int n = logits.length;
        double[] x = new double[n];
        for (int k = 0; k < n; k++) x[k] = logits[k];
        if (repetitionPenalty != 1.0 || presencePenalty != 0.0 || frequencyPenalty != 0.0) {
            for (Map.Entry<Integer, Integer> e : counts.entrySet()) {
                double v = x[e.getKey()];
                if (repetitionPenalty != 1.0) v = v > 0 ? v / repetitionPenalty : v * repetitionPenalty;
                v = v - presencePenalty;
                v = v - frequencyPenalty * e.getValue();
                x[e.getKey()] = v;
            }
        }
        if (temperature <= 0) {
            int best = 0;
            for (int k = 1; k < n; k++) if (x[k] > x[best]) best = k;
            return best;
        }
        double[] z = new double[n];
        for (int k = 0; k < n; k++) z[k] = x[k] / temperature;
        int[] order = topK > 0 && topK < n ? best(z, topK) : sortAll(z);
        double top = z[order[0]];
        if (top == Double.NEGATIVE_INFINITY) return order[0];
        double[] w = new double[order.length];
        for (int k = 0; k < order.length; k++) w[k] = Math.exp(z[order[k]] - top);
        int keep = w.length;
        if (topP < 1.0) {
            double total = 0;
            for (double v : w) total += v;
            double limit = topP * total, acc = 0;
            keep = 0;
            for (int k = 0; k < w.length; k++) {
                if (k > 0 && acc >= limit) break;
                acc += w[k];
                keep = k + 1;
            }
        }
        if (minP > 0.0) {
            double threshold = minP * w[0];
            for (int k = 1; k < keep; k++) {
                if (w[k] < threshold) {
                    keep = k;
                    break;
                }
            }
        }
        double total = 0;
        for (int k = 0; k < keep; k++) total += w[k];
        double u = rng.nextDouble() * total, acc = 0;
        for (int k = 0; k < keep; k++) {
            acc += w[k];
            if (u < acc) return order[k];
        }
        return order[keep - 1];
    }

    /** a before b: larger value first, then lower index (IEEE comparison: -0.0 equals 0.0). */
    private static int compare(double[] z, int a, int b) {
        if (z[a] > z[b]) return -1;
        if (z[a] < z[b]) return 1;
        return Integer.compare(a, b);
    }

    private static int[] sortAll(double[] z) {
        Integer[] idx = new Integer[z.length];
        for (int k = 0; k < z.length; k++) idx[k] = k;
        java.util.Arrays.sort(idx, (a, b) -> compare(z, a, b));
        int[] out = new int[z.length];
        for (int k = 0; k < z.length; k++) out[k] = idx[k];
        return out;
    }

    /** The k best indices in order, in O(n log k). */
    private static int[] best(double[] z, int k) {
        java.util.PriorityQueue<Integer> worstFirst = new java.util.PriorityQueue<>(k + 1, (a, b) -> compare(z, b, a));
        for (int i = 0; i < z.length; i++) {
            if (worstFirst.size() < k) {
                worstFirst.add(i);
            } else if (compare(z, i, worstFirst.peek()) < 0) {
                worstFirst.poll();
                worstFirst.add(i);
            }
        }
        int[] out = new int[worstFirst.size()];
        for (int i = out.length - 1; i >= 0; i--) out[i] = worstFirst.poll();
        return out;
    }
}
