import Foundation

/// Multi-turn chat that continues from the engine's state: a line-for-line mirror of
/// qwen_mobile.chat_format.Conversation and android_demo/core Conversation.java (see there).
public final class Conversation {
    public enum Finish: String { case stop, length, context, loop, cancelled }

    public struct Reply {
        public let tokens: [Int]
        public let text: String
        public let finish: Finish
        public let promptTokens: Int
        public let rebuilt: Bool
        public let prefillSeconds: Double
        public let decodeSeconds: Double
        public let decodeSteps: Int

        public var decodeTokensPerSecond: Double { decodeSeconds > 0 ? Double(decodeSteps) / decodeSeconds : 0 }
        public var prefillTokensPerSecond: Double { prefillSeconds > 0 ? Double(promptTokens) / prefillSeconds : 0 }
    }

    private let engine: Engine
    private let format: ChatFormat
    private let tokenizer: TextTokenizer
    private let stopIds: Set<Int>
    private let system: String?
    public let contextSize: Int
    private var rng: SplitMix64
    public var sampling: Sampling
    public var enableThinking: Bool?
    public var maxNewTokens: Int
    public var loopGuard: LoopGuard?

    public private(set) var messages: [ChatFormat.Message] = []
    private var firstKept = 0
    public private(set) var fed: [Int] = []
    private var pending: Int?
    private var lastFinish: Finish?
    private var turnEnd = -1
    private var turnLogits: [Float] = []
    private var turnState: Any?
    private var prefillSeconds = 0.0

    public init(engine: Engine, format: ChatFormat, tokenizer: TextTokenizer, stopIds: [Int], sampling: Sampling, seed: UInt64,
                system: String?, enableThinking: Bool?, maxNewTokens: Int, loopGuard: LoopGuard?, maxContext: Int = 0) {
        self.engine = engine
        self.format = format
        self.tokenizer = tokenizer
        self.stopIds = Set(stopIds)
        self.sampling = sampling
        self.rng = SplitMix64(seed: seed)
        self.system = system
        self.enableThinking = enableThinking
        self.maxNewTokens = maxNewTokens
        self.loopGuard = loopGuard
        contextSize = maxContext > 0 ? min(maxContext, engine.maxContext) : engine.maxContext
        if let system { messages.append(.system(system)) }
        firstKept = messages.count
    }

    public var canRegenerate: Bool { turnEnd >= 0 }

    /// Prefill the new turn's own tokens (or rebuild when they do not fit), then reply.
    public func say(_ text: String, onToken: ((Int) -> Void)? = nil, cancelled: (() -> Bool)? = nil) throws -> Reply {
        var rebuilt = false
        let ids = try turnTokens(text, &rebuilt)
        messages.append(.user(text))
        if rebuilt {
            fed.removeAll()
            pending = nil
        }
        if fed.count + ids.count > contextSize {
            throw JSONError("the message is \(ids.count) tokens; the context holds \(contextSize)")
        }
        let logits = try prefill(ids, start: fed.count)
        fed.append(contentsOf: ids)
        turnEnd = fed.count
        turnLogits = logits
        turnState = try engine.canSnapshot ? engine.snapshot() : nil
        return try reply(logits, onToken, cancelled, promptTokens: ids.count, rebuilt: rebuilt)
    }

    /// The last reply again (the random stream goes on, so a sampled reply differs).
    public func regenerate(onToken: ((Int) -> Void)? = nil, cancelled: (() -> Bool)? = nil) throws -> Reply {
        guard turnEnd >= 0 else { throw JSONError("nothing to regenerate") }
        messages.removeLast()
        fed.removeSubrange(turnEnd...)
        let logits: [Float]
        let prompt: Int
        if let state = turnState {
            try engine.restore(state)
            logits = turnLogits
            prompt = 0
            prefillSeconds = 0
        } else {
            logits = try prefill(fed, start: 0)
            prompt = fed.count
        }
        return try reply(logits, onToken, cancelled, promptTokens: prompt, rebuilt: false)
    }

    private func turnTokens(_ text: String, _ rebuilt: inout Bool) throws -> [Int] {
        let turnText = format.renderUser(text) + format.generationPrompt(enableThinking)
        if fed.isEmpty { return tokenizer.encode(try format.renderHead(system) + turnText) }
        var suffix = format.assistant.suffix
        var closing: [Int] = []
        if let pending {
            let pendingText = tokenizer.decode([pending], skipSpecial: false)
            if lastFinish != .stop {
                closing = [pending]
            } else if suffix.unicodeScalars.starts(with: pendingText.unicodeScalars) {
                closing = [pending]
                suffix = String(suffix.unicodeScalars.dropFirst(pendingText.unicodeScalars.count))
            }
        }
        let ids = closing + tokenizer.encode(suffix + turnText)
        if fed.count + ids.count + reserve <= contextSize { return ids }
        rebuilt = true
        return try window(text)
    }

    private var reserve: Int { min(maxNewTokens, contextSize / 4) }

    private func window(_ text: String) throws -> [Int] {
        while true {
            var kept: [ChatFormat.Message] = system != nil ? [messages[0]] : []
            let body = Array(messages[firstKept...])
            kept += body
            kept.append(.user(text))
            let ids = tokenizer.encode(try format.render(kept, addGenerationPrompt: true, enableThinking: enableThinking))
            if ids.count + reserve <= contextSize || body.isEmpty { return ids }
            firstKept += 2
        }
    }

    private func prefill(_ ids: [Int], start: Int) throws -> [Float] {
        let began = Date()
        var logits: [Float] = []
        var at = 0
        while at < ids.count {
            let end = min(ids.count, at + engine.maxChunk)
            logits = try engine.step(Array(ids[at..<end]), start: start + at)
            at = end
        }
        prefillSeconds = Date().timeIntervalSince(began)
        return logits
    }

    private func reply(_ first: [Float], _ onToken: ((Int) -> Void)?, _ cancelled: (() -> Bool)?, promptTokens: Int,
                       rebuilt: Bool) throws -> Reply {
        var logits = first
        var tokens: [Int] = []
        var counts: [Int: Int] = [:]
        var position = fed.count
        var finish: Finish?
        var decodeSeconds = 0.0
        var decodeSteps = 0
        while finish == nil {
            let token = sampling.sample(logits, counts: counts, rng: &rng)
            pending = token
            if stopIds.contains(token) {
                finish = .stop
                break
            }
            tokens.append(token)
            counts[token, default: 0] += 1
            onToken?(token)
            if tokens.count >= maxNewTokens {
                finish = .length
            } else if let loopGuard, loopGuard.looping(tokens) {
                finish = .loop
            } else if cancelled?() == true {
                finish = .cancelled
            } else if position >= contextSize {
                finish = .context
            } else {
                let began = Date()
                logits = try engine.step([token], start: position)
                decodeSeconds += Date().timeIntervalSince(began)
                decodeSteps += 1
                fed.append(token)
                position += 1
                pending = nil
            }
        }
        lastFinish = finish
        let text = tokenizer.decode(tokens, skipSpecial: false)
        messages.append(.assistant(text))
        return Reply(tokens: tokens, text: text, finish: finish!, promptTokens: promptTokens, rebuilt: rebuilt,
                     prefillSeconds: prefillSeconds, decodeSeconds: decodeSeconds, decodeSteps: decodeSteps)
    }
}
