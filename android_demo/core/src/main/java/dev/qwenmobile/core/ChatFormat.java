package dev.qwenmobile.core;

import java.util.List;
import java.util.Map;

/**
 * The manifest's {@code chat_format}: the checkpoint's chat template as fixed strings, checked at
 * export against the template's own rendering (qwen_mobile/chat_format.py, which this mirrors).
 * Domain: an optional system message first, then user and assistant alternating, starting and
 * ending with a user message.
 */
public final class ChatFormat {
    /** Python's str.strip() whitespace, which Jinja's trim filter removes. */
    static final String PY_WHITESPACE = "\t\n\u000b\u000c\r\u001c\u001d\u001e\u001f \u0085\u00a0\u1680"
            + "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000";

    public static final class Block {
        public final String prefix, suffix;
        public final boolean trim;
        /** After trimming, keep only the text after the last {@code stripClose}, less leading {@code stripChars}. */
        public final String stripClose, stripChars;

        Block(Map<String, Object> m, String what) {
            prefix = Json.str(m.get("prefix"), what + ".prefix");
            suffix = Json.str(m.get("suffix"), what + ".suffix");
            trim = Json.bool(m.get("trim"), what + ".trim");
            Object strip = m.get("strip_thinking");
            if (strip != null) {
                Map<String, Object> s = Json.obj(strip, what + ".strip_thinking");
                stripClose = Json.str(s.get("close"), what + ".strip_thinking.close");
                stripChars = Json.str(s.get("lstrip"), what + ".strip_thinking.lstrip");
            } else {
                stripClose = stripChars = null;
            }
        }

        String content(String text, boolean history) {
            if (trim) text = strip(text, PY_WHITESPACE);
            if (history && stripClose != null && text.contains(stripClose)) {
                text = lstrip(text.substring(text.lastIndexOf(stripClose) + stripClose.length()), stripChars);
            }
            return text;
        }

        String render(String text, boolean history) {
            return prefix + content(text, history) + suffix;
        }
    }

    public static final class Thinking {
        public final boolean byDefault;
        public final String on, off, open, close;

        Thinking(Map<String, Object> m) {
            byDefault = Json.bool(m.get("default"), "thinking.default");
            on = Json.str(m.get("on"), "thinking.on");
            off = Json.str(m.get("off"), "thinking.off");
            open = Json.str(m.get("open"), "thinking.open");
            close = Json.str(m.get("close"), "thinking.close");
        }
    }

    /** A chat message: role "system", "user" or "assistant". */
    public static final class Message {
        public final String role, content;

        public Message(String role, String content) {
            this.role = role;
            this.content = content;
        }

        public static Message system(String text) {
            return new Message("system", text);
        }

        public static Message user(String text) {
            return new Message("user", text);
        }

        public static Message assistant(String text) {
            return new Message("assistant", text);
        }
    }

    public final Block system, user, assistant; // system null: the template renders none
    public final String preamble, generationPrompt;
    public final Thinking thinking; // null: the template takes no enable_thinking

    public ChatFormat(Map<String, Object> m) {
        Object version = m.get("version");
        if (version == null || Json.num(version, "chat_format.version").intValue() != 1) {
            throw new Json.JsonException("chat_format.version: expected 1, got " + version);
        }
        system = m.get("system") == null ? null : new Block(Json.obj(m.get("system"), "chat_format.system"), "chat_format.system");
        user = new Block(Json.field(m, "user", "chat_format"), "chat_format.user");
        assistant = new Block(Json.field(m, "assistant", "chat_format"), "chat_format.assistant");
        preamble = Json.str(m.get("preamble"), "chat_format.preamble");
        generationPrompt = Json.str(m.get("generation_prompt"), "chat_format.generation_prompt");
        thinking = m.get("thinking") == null ? null : new Thinking(Json.obj(m.get("thinking"), "chat_format.thinking"));
    }

    public boolean thinkingOn(Boolean enableThinking) {
        if (thinking == null) return false;
        return enableThinking == null ? thinking.byDefault : enableThinking;
    }

    public String generationPrompt(Boolean enableThinking) {
        if (thinking == null) return generationPrompt;
        return thinkingOn(enableThinking) ? thinking.on : thinking.off;
    }

    /** What comes before the first user message: the system block, or the preamble. */
    public String renderHead(String systemText) {
        if (systemText == null) return preamble;
        if (system == null) throw new IllegalArgumentException("this chat format has no system role");
        return system.render(systemText, false);
    }

    public String renderUser(String text) {
        return user.render(text, false);
    }

    /** An earlier reply as the template renders it in the history. */
    public String renderAssistant(String text) {
        return assistant.render(text, true);
    }

    public String render(List<Message> messages, boolean addGenerationPrompt, Boolean enableThinking) {
        check(messages);
        StringBuilder out = new StringBuilder();
        boolean hasSystem = messages.get(0).role.equals("system");
        out.append(renderHead(hasSystem ? messages.get(0).content : null));
        for (int k = hasSystem ? 1 : 0; k < messages.size(); k++) {
            Message m = messages.get(k);
            out.append(m.role.equals("user") ? renderUser(m.content) : renderAssistant(m.content));
        }
        if (addGenerationPrompt) out.append(generationPrompt(enableThinking));
        return out.toString();
    }

    void check(List<Message> messages) {
        int start = !messages.isEmpty() && messages.get(0).role.equals("system") ? 1 : 0;
        if (start == 1 && system == null) throw new IllegalArgumentException("this chat format has no system role");
        int body = messages.size() - start;
        boolean ok = body % 2 == 1;
        for (int k = start; ok && k < messages.size(); k++) {
            ok = messages.get(k).role.equals((k - start) % 2 == 0 ? "user" : "assistant");
        }
        if (!ok) throw new IllegalArgumentException("messages must be [system], then user and assistant alternating, ending with user");
    }

    /** {thinking, answer} of a reply as generated (see qwen_mobile.chat_format.split_thinking). */
    public String[] splitThinking(Boolean enableThinking, String reply) {
        if (thinking == null || !thinkingOn(enableThinking)) return new String[] {"", reply};
        int at = reply.indexOf(thinking.close);
        if (at < 0) return new String[] {reply, ""};
        return new String[] {strip(reply.substring(0, at), "\n"), lstrip(reply.substring(at + thinking.close.length()), "\n")};
    }

    static String strip(String text, String chars) {
        return rstrip(lstrip(text, chars), chars);
    }

    static String lstrip(String text, String chars) {
        int start = 0;
        while (start < text.length() && chars.indexOf(text.charAt(start)) >= 0) start++;
        return text.substring(start);
    }

    static String rstrip(String text, String chars) {
        int end = text.length();
        while (end > 0 && chars.indexOf(text.charAt(end - 1)) >= 0) end--;
        return text.substring(0, end);
    }
}
