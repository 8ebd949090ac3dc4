package dev.qwenmobile.core;

import java.util.LinkedHashMap;
import java.util.Map;

/** The manifest's {@code generation}: sampling per mode, reply length, loop guard. */
public final class Generation {
    public final String defaultMode;
    public final Map<String, Sampling> modes = new LinkedHashMap<>();
    public final Map<String, String> sources = new LinkedHashMap<>();
    public final int maxNewTokens;
    public final LoopGuard loopGuard;

    public Generation(Map<String, Object> m) {
        defaultMode = Json.str(m.get("default_mode"), "generation.default_mode");
        for (Map.Entry<String, Object> e : Json.field(m, "modes", "generation").entrySet()) {
            Map<String, Object> mode = Json.obj(e.getValue(), "generation.modes." + e.getKey());
            modes.put(e.getKey(), Sampling.fromJson(mode));
            if (mode.get("source") instanceof String) sources.put(e.getKey(), (String) mode.get("source"));
        }
        if (!modes.containsKey("non_thinking") || !modes.containsKey(defaultMode)) {
            throw new Json.JsonException("generation.modes: needs non_thinking and the default mode " + defaultMode);
        }
        maxNewTokens = Json.num(m.get("max_new_tokens"), "generation.max_new_tokens").intValue();
        loopGuard = LoopGuard.fromJson(Json.field(m, "loop_guard", "generation"));
    }

    /** The sampling for a conversation's mode (qwen_mobile.chat_format.sampling_for). */
    public Sampling sampling(Boolean enableThinking, ChatFormat format) {
        String name;
        if (enableThinking == null) {
            name = defaultMode;
        } else {
            name = enableThinking && modes.containsKey("thinking") ? "thinking" : "non_thinking";
        }
        if (format != null && format.thinking == null) name = "non_thinking";
        return modes.get(name);
    }
}
