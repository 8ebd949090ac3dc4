package dev.qwenmobile.core;

/**
 * A loaded artifact, driven the way qwen_mobile's runners are: feed token ids at positions
 * {@code start..}, get the last position's logits. A call at start 0 begins a new sequence. The
 * engine keeps its state between calls (ExecuTorch inside the program, LiteRT as tensors it
 * feeds back, Core ML in an MLState).
 */
public interface Engine extends AutoCloseable {
    int maxContext();

    /** The most tokens one call takes (the manifest's max_seq_len). */
    int maxChunk();

    float[] step(int[] tokens, int start) throws Exception;

    /** Whether {@link #snapshot} can copy the state (LiteRT: yes; ExecuTorch: the program holds it). */
    default boolean canSnapshot() {
        return false;
    }

    /** A copy of the state, for {@link #restore}. */
    default Object snapshot() {
        throw new UnsupportedOperationException("this engine cannot copy its state");
    }

    default void restore(Object snapshot) {
        throw new UnsupportedOperationException("this engine cannot copy its state");
    }

    @Override default void close() {}
}
