package dev.qwenmobile.core;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.function.BooleanSupplier;

/**
 * Multi-turn chat that continues from the engine's state (qwen_mobile.chat_format.Conversation,
 * which this mirrors step for step; the replay tests hold both to the same tokens).
 *
 * <p>Each new turn prefills only its own tokens: the token that ended the previous reply (when it
 * is the start of the assistant suffix, as {@code <|im_end|>} is), the rest of that suffix, the user
 * turn and the generation prompt. The earlier turns are never fed again. When a turn does not fit,
 * the most recent messages that do are rendered as the template renders them and prefilled from
 * position 0 (the system message is kept). Regenerating the last reply restores a copy of the state
 * taken after the turn's prefill where the engine can copy its state, and otherwise re-prefills the
 * context up to that point from position 0.
 */
public final class Conversation {
    public enum Finish { STOP, LENGTH, CONTEXT, LOOP, CANCELLED }

    /** Called with each token of a reply as it is sampled, before the next one is computed. */
    public interface TokenListener {
        void onToken(int token);
    }

    public static final class Reply {
        public final int[] tokens; // without the stop token
        public final String text;
        public final Finish finish;
        public final int promptTokens; // tokens this turn prefilled
        public final boolean rebuilt; // the context was re-rendered from position 0
        public final long prefillNanos, decodeNanos;
        public final int decodeSteps;

        Reply(int[] tokens, String text, Finish finish, int promptTokens, boolean rebuilt, long prefillNanos,
              long decodeNanos, int decodeSteps) {
            this.tokens = tokens;
            this.text = text;
            this.finish = finish;
            this.promptTokens = promptTokens;
            this.rebuilt = rebuilt;
            this.prefillNanos = prefillNanos;
            this.decodeNanos = decodeNanos;
            this.decodeSteps = decodeSteps;
        }

        /** Decode speed, tokens per second (0 when nothing was decoded). */
        public double decodeTokensPerSecond() {
            return decodeNanos > 0 ? decodeSteps * 1e9 / decodeNanos : 0;
        }

        public double prefillTokensPerSecond() {
            return prefillNanos > 0 ? promptTokens * 1e9 / prefillNanos : 0;
        }
    }

    private final Engine engine;
    private final ChatFormat format;
    private final Tokenizer tokenizer;
    private final int[] stopIds;
    private final String system;
    private final int context;
    private final SplitMix64 rng;
    private Sampling sampling;
    private Boolean enableThinking;
    private int maxNewTokens;
    private LoopGuard loopGuard;

    private final List<ChatFormat.Message> messages = new ArrayList<>();
    private int firstKept; // messages before this index are no longer in the context
    private final List<Integer> fed = new ArrayList<>(); // every token the engine holds; position = index
    private Integer pending; // sampled last, not yet fed
    private Finish lastFinish;
    private int turnEnd = -1; // context length after the last turn's prefill
    private float[] turnLogits;
    private Object turnState;
    private long prefillNanos;

    /**
     * @param maxContext at most the engine's; 0 for the engine's
     * @param loopGuard null for none
     */
    public Conversation(Engine engine, ChatFormat format, Tokenizer tokenizer, int[] stopIds, Sampling sampling,
                        long seed, String system, Boolean enableThinking, int maxNewTokens, LoopGuard loopGuard,
                        int maxContext) {
        if (format == null) throw new IllegalArgumentException("this bundle has no chat_format (see its manifest)");
        this.engine = engine;
        this.format = format;
        this.tokenizer = tokenizer;
        this.stopIds = stopIds.clone();
        this.sampling = sampling;
        this.rng = new SplitMix64(seed);
        this.system = system;
        this.enableThinking = enableThinking;
        this.maxNewTokens = maxNewTokens;
        this.loopGuard = loopGuard;
        int limit = engine.maxContext();
        this.context = maxContext > 0 ? Math.min(maxContext, limit) : limit;
        if (system != null) messages.add(ChatFormat.Message.system(system));
        firstKept = messages.size();
    }

    public void setMaxNewTokens(int maxNewTokens) {
        this.maxNewTokens = maxNewTokens;
    }

    public void setEnableThinking(Boolean enableThinking) {
        this.enableThinking = enableThinking;
    }

    public Boolean enableThinking() {
        return enableThinking;
    }

    public void setSampling(Sampling sampling) {
        this.sampling = sampling;
    }

    public void setLoopGuard(LoopGuard loopGuard) {
        this.loopGuard = loopGuard;
    }

    public List<ChatFormat.Message> messages() {
        return Collections.unmodifiableList(messages);
    }

    /** Every token the engine holds, in position order. */
    public List<Integer> fed() {
        return Collections.unmodifiableList(fed);
    }

    public int contextUsed() {
        return fed.size();
    }

    public int contextSize() {
        return context;
    }

    public boolean canRegenerate() {
        return turnEnd >= 0;
    }

    /** Prefill the new turn's own tokens (or rebuild when they do not fit), then reply. */
    public Reply say(String text, TokenListener listener, BooleanSupplier cancelled) throws Exception {
        boolean[] rebuilt = new boolean[1];
        int[] ids = turnTokens(text, rebuilt);
        messages.add(ChatFormat.Message.user(text));
        if (rebuilt[0]) {
            fed.clear();
            pending = null;
        }
        if (fed.size() + ids.length > context) {
            throw new IllegalArgumentException("the message is " + ids.length + " tokens; the context holds " + context);
        }
        float[] logits = prefill(ids, fed.size());
        for (int id : ids) fed.add(id);
        turnEnd = fed.size();
        turnLogits = logits;
        turnState = engine.canSnapshot() ? engine.snapshot() : null;
        return reply(logits, listener, cancelled, ids.length, rebuilt[0]);
    }

    /** The last reply again (the random stream goes on, so a sampled reply differs). */
    public Reply regenerate(TokenListener listener, BooleanSupplier cancelled) throws Exception {
        if (turnEnd < 0) throw new IllegalStateException("nothing to regenerate");
        messages.remove(messages.size() - 1);
        fed.subList(turnEnd, fed.size()).clear();
        float[] logits;
        int prompt;
        if (turnState != null) {
            engine.restore(turnState);
            logits = turnLogits;
            prompt = 0;
            prefillNanos = 0;
        } else {
            int[] all = new int[fed.size()];
            for (int k = 0; k < all.length; k++) all[k] = fed.get(k);
            logits = prefill(all, 0);
            prompt = all.length;
        }
        return reply(logits, listener, cancelled, prompt, false);
    }

    private int[] turnTokens(String text, boolean[] rebuilt) {
        String turnText = format.renderUser(text) + format.generationPrompt(enableThinking);
        if (fed.isEmpty()) return tokenizer.encode(format.renderHead(system) + turnText);
        String suffix = format.assistant.suffix;
        int[] closing = new int[0];
        if (pending != null) {
            String pendingText = tokenizer.decode(new int[] {pending}, false);
            if (lastFinish != Finish.STOP) {
                closing = new int[] {pending}; // shown to the user: it belongs to the reply
            } else if (suffix.startsWith(pendingText)) {
                closing = new int[] {pending};
                suffix = suffix.substring(pendingText.length());
            }
        }
        int[] rest = tokenizer.encode(suffix + turnText);
        int[] ids = Arrays.copyOf(closing, closing.length + rest.length);
        System.arraycopy(rest, 0, ids, closing.length, rest.length);
        if (fed.size() + ids.length + reserve() <= context) return ids;
        rebuilt[0] = true;
        return window(text);
    }

    private int reserve() {
        return Math.min(maxNewTokens, context / 4);
    }

    /** The most recent messages that fit, rendered as the template renders them. */
    private int[] window(String text) {
        while (true) {
            List<ChatFormat.Message> kept = new ArrayList<>();
            if (system != null) kept.add(messages.get(0));
            List<ChatFormat.Message> body = messages.subList(firstKept, messages.size());
            kept.addAll(body);
            kept.add(ChatFormat.Message.user(text));
            int[] ids = tokenizer.encode(format.render(kept, true, enableThinking));
            if (ids.length + reserve() <= context || body.isEmpty()) return ids;
            firstKept += 2;
        }
    }

    private float[] prefill(int[] ids, int start) throws Exception {
        long began = System.nanoTime();
        float[] logits = null;
        int chunk = engine.maxChunk();
        for (int at = 0; at < ids.length; at += chunk) {
            logits = engine.step(Arrays.copyOfRange(ids, at, Math.min(ids.length, at + chunk)), start + at);
        }
        prefillNanos = System.nanoTime() - began;
        return logits;
    }

    private boolean isStop(int token) {
        for (int id : stopIds) if (id == token) return true;
        return false;
    }

    private Reply reply(float[] logits, TokenListener listener, BooleanSupplier cancelled, int promptTokens,
                        boolean rebuilt) throws Exception {
        List<Integer> tokens = new ArrayList<>();
        Map<Integer, Integer> counts = new LinkedHashMap<>();
        int position = fed.size();
        Finish finish = null;
        long decodeNanos = 0;
        int decodeSteps = 0;
        while (finish == null) {
            int token = sampling.sample(logits, counts, rng);
            pending = token;
            if (isStop(token)) {
                finish = Finish.STOP;
                break;
            }
            tokens.add(token);
            counts.merge(token, 1, Integer::sum);
            if (listener != null) listener.onToken(token);
            if (tokens.size() >= maxNewTokens) {
                finish = Finish.LENGTH;
            } else if (loopGuard != null && loopGuard.looping(tokens)) {
                finish = Finish.LOOP;
            } else if (cancelled != null && cancelled.getAsBoolean()) {
                finish = Finish.CANCELLED;
            } else if (position >= context) {
                finish = Finish.CONTEXT;
            } else {
                long began = System.nanoTime();
                logits = engine.step(new int[] {token}, position);
                decodeNanos += System.nanoTime() - began;
                decodeSteps++;
                fed.add(token);
                position++;
                pending = null;
            }
        }
        lastFinish = finish;
        int[] ids = new int[tokens.size()];
        for (int k = 0; k < ids.length; k++) ids[k] = tokens.get(k);
        String text = tokenizer.decode(ids, false);
        messages.add(ChatFormat.Message.assistant(text));
        return new Reply(ids, text, finish, promptTokens, rebuilt, prefillNanos, decodeNanos, decodeSteps);
    }
}
