import Foundation

/// The manifest's `chat_format` (qwen_mobile/chat_format.py; android_demo/core ChatFormat.java).
public struct ChatFormat {
    /// Python's str.strip() whitespace, which Jinja's trim filter removes.
    static let pyWhitespace: Set<Character> = Set(
        "\t\n\u{0b}\u{0c}\r\u{1c}\u{1d}\u{1e}\u{1f} \u{85}\u{a0}\u{1680}\u{2000}\u{2001}\u{2002}\u{2003}\u{2004}\u{2005}"
            + "\u{2006}\u{2007}\u{2008}\u{2009}\u{200a}\u{2028}\u{2029}\u{202f}\u{205f}\u{3000}")

    public struct Block {
        public let prefix: String, suffix: String, trim: Bool
        public let stripClose: String?, stripChars: String?

        init(_ m: [String: Any], _ what: String) throws {
            prefix = try J.str(m["prefix"], "\(what).prefix")
            suffix = try J.str(m["suffix"], "\(what).suffix")
            trim = try J.bool(m["trim"], "\(what).trim")
            if J.isNull(m["strip_thinking"]) {
                stripClose = nil
                stripChars = nil
            } else {
                let s = try J.obj(m["strip_thinking"], "\(what).strip_thinking")
                stripClose = try J.str(s["close"], "\(what).strip_thinking.close")
                stripChars = try J.str(s["lstrip"], "\(what).strip_thinking.lstrip")
            }
        }

        func content(_ text: String, history: Bool) -> String {
            var text = text
            if trim { text = ChatFormat.strip(text, ChatFormat.pyWhitespace) }
            if history, let close = stripClose, let range = text.range(of: close, options: [.literal, .backwards]) {
                text = ChatFormat.lstrip(String(text[range.upperBound...]), Set(stripChars ?? ""))
            }
            return text
        }

        func render(_ text: String, history: Bool) -> String { prefix + content(text, history: history) + suffix }
    }

    public struct Thinking {
        public let byDefault: Bool
        public let on: String, off: String, open: String, close: String
    }

    public struct Message: Equatable {
        public let role: String, content: String
        public init(role: String, content: String) { self.role = role; self.content = content }
        public static func user(_ text: String) -> Message { Message(role: "user", content: text) }
        public static func assistant(_ text: String) -> Message { Message(role: "assistant", content: text) }
        public static func system(_ text: String) -> Message { Message(role: "system", content: text) }
    }

    public let system: Block?
    public let user: Block
    public let assistant: Block
    public let preamble: String
    public let generationPrompt: String
    public let thinking: Thinking?

    public init(_ m: [String: Any]) throws {
        guard let version = m["version"] as? NSNumber, version.intValue == 1 else {
            throw JSONError("chat_format.version: expected 1")
        }
        system = try J.isNull(m["system"]) ? nil : Block(J.obj(m["system"], "chat_format.system"), "chat_format.system")
        user = try Block(J.obj(m["user"], "chat_format.user"), "chat_format.user")
        assistant = try Block(J.obj(m["assistant"], "chat_format.assistant"), "chat_format.assistant")
        preamble = try J.str(m["preamble"], "chat_format.preamble")
        generationPrompt = try J.str(m["generation_prompt"], "chat_format.generation_prompt")
        if J.isNull(m["thinking"]) {
            thinking = nil
        } else {
            let t = try J.obj(m["thinking"], "chat_format.thinking")
            thinking = Thinking(byDefault: try J.bool(t["default"], "thinking.default"), on: try J.str(t["on"], "thinking.on"),
                                off: try J.str(t["off"], "thinking.off"), open: try J.str(t["open"], "thinking.open"),
                                close: try J.str(t["close"], "thinking.close"))
        }
    }

    public func thinkingOn(_ enableThinking: Bool?) -> Bool {
        guard let thinking else { return false }
        return enableThinking ?? thinking.byDefault
    }

    public func generationPrompt(_ enableThinking: Bool?) -> String {
        guard let thinking else { return generationPrompt }
        return thinkingOn(enableThinking) ? thinking.on : thinking.off
    }

    public func renderHead(_ systemText: String?) throws -> String {
        guard let systemText else { return preamble }
        guard let system else { throw JSONError("this chat format has no system role") }
        return system.render(systemText, history: false)
    }

    public func renderUser(_ text: String) -> String { user.render(text, history: false) }

    public func renderAssistant(_ text: String) -> String { assistant.render(text, history: true) }

    public func render(_ messages: [Message], addGenerationPrompt: Bool, enableThinking: Bool?) throws -> String {
        try check(messages)
        let hasSystem = messages[0].role == "system"
        var out = try renderHead(hasSystem ? messages[0].content : nil)
        for message in messages.dropFirst(hasSystem ? 1 : 0) {
            out += message.role == "user" ? renderUser(message.content) : renderAssistant(message.content)
        }
        if addGenerationPrompt { out += generationPrompt(enableThinking) }
        return out
    }

    func check(_ messages: [Message]) throws {
        let start = messages.first?.role == "system" ? 1 : 0
        if start == 1 && system == nil { throw JSONError("this chat format has no system role") }
        let body = Array(messages.dropFirst(start))
        var ok = body.count % 2 == 1
        for (k, message) in body.enumerated() where ok { ok = message.role == (k % 2 == 0 ? "user" : "assistant") }
        if !ok { throw JSONError("messages must be [system], then user and assistant alternating, ending with user") }
    }

    /// (thinking, answer) of a reply as generated.
    public func splitThinking(_ enableThinking: Bool?, _ reply: String) -> (String, String) {
        guard let thinking, thinkingOn(enableThinking) else { return ("", reply) }
        guard let range = reply.range(of: thinking.close, options: .literal) else { return (reply, "") }
        let newline: Set<Character> = ["\n"]
        return (ChatFormat.strip(String(reply[..<range.lowerBound]), newline),
                ChatFormat.lstrip(String(reply[range.upperBound...]), newline))
    }

    // Character-wise over unicode scalars, as Python strips code points ("\r\n" is one Swift Character).
    static func lstrip(_ text: String, _ chars: Set<Character>) -> String {
        let scalars = text.unicodeScalars
        var start = scalars.startIndex
        while start < scalars.endIndex, chars.contains(Character(scalars[start])) { start = scalars.index(after: start) }
        return String(scalars[start...])
    }

    static func strip(_ text: String, _ chars: Set<Character>) -> String {
        let left = lstrip(text, chars)
        let scalars = left.unicodeScalars
        var end = scalars.endIndex
        while end > scalars.startIndex, chars.contains(Character(scalars[scalars.index(before: end)])) {
            end = scalars.index(before: end)
        }
        return String(scalars[..<end])
    }
}
