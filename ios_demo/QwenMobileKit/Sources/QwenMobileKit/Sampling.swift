import Foundation

/// The apps' random stream (qwen_mobile.chat_format.SplitMix64): SplitMix64, doubles from the top 53 bits.
public struct SplitMix64 {
    private var state: UInt64

    public init(seed: UInt64) { state = seed }

    public mutating func nextLong() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    public mutating func nextDouble() -> Double { Double(nextLong() >> 11) * 0x1.0p-53 }
}

/// Sampling parameters and the sampler, exactly as qwen_mobile.chat_format.sample (and Sampling.java).
public struct Sampling: Equatable {
    public var temperature = 0.0, topP = 1.0, topK = 0, minP = 0.0
    public var presencePenalty = 0.0, frequencyPenalty = 0.0, repetitionPenalty = 1.0

    public init(temperature: Double = 0, topP: Double = 1, topK: Int = 0, minP: Double = 0, presencePenalty: Double = 0,
                frequencyPenalty: Double = 0, repetitionPenalty: Double = 1) {
        self.temperature = temperature
        self.topP = topP
        self.topK = topK
        self.minP = minP
        self.presencePenalty = presencePenalty
        self.frequencyPenalty = frequencyPenalty
        self.repetitionPenalty = repetitionPenalty
    }

    public init(json m: [String: Any]) throws {
        self.init(temperature: try J.double(m["temperature"], "temperature", 0), topP: try J.double(m["top_p"], "top_p", 1),
                  topK: Int(try J.double(m["top_k"], "top_k", 0)), minP: try J.double(m["min_p"], "min_p", 0),
                  presencePenalty: try J.double(m["presence_penalty"], "presence_penalty", 0),
                  frequencyPenalty: try J.double(m["frequency_penalty"], "frequency_penalty", 0),
                  repetitionPenalty: try J.double(m["repetition_penalty"], "repetition_penalty", 1))
    }

    /// One token; `counts` maps each token of the current reply to its count.
    public func sample(_ logits: [Float], counts: [Int: Int], rng: inout SplitMix64) -> Int {
        var x = logits.map { Double($0) }
        if repetitionPenalty != 1.0 || presencePenalty != 0.0 || frequencyPenalty != 0.0 {
            for (token, count) in counts {
                var v = x[token]
                if repetitionPenalty != 1.0 { v = v > 0 ? v / repetitionPenalty : v * repetitionPenalty }
                v = v - presencePenalty
                v = v - frequencyPenalty * Double(count)
                x[token] = v
            }
        }
        if temperature <= 0 {
            var best = 0
            for k in 1..<x.count where x[k] > x[best] { best = k }
            return best
        }
        let z = x.map { $0 / temperature }
        // (value desc, index asc), IEEE comparison (-0.0 equals 0.0), as numpy's lexsort in Python
        let before: (Int, Int) -> Bool = { a, b in z[a] > z[b] || (!(z[a] < z[b]) && a < b) }
        let order = topK > 0 && topK < z.count ? Sampling.best(z.count, topK, before) : Array(0..<z.count).sorted(by: before)
        let top = z[order[0]]
        if top == -Double.infinity { return order[0] }
        let w = order.map { Foundation.exp(z[$0] - top) }
        var keep = w.count
        if topP < 1.0 {
            var total = 0.0
            for v in w { total += v }
            let limit = topP * total
            var acc = 0.0
            keep = 0
            for k in 0..<w.count {
                if k > 0 && acc >= limit { break }
                acc += w[k]
                keep = k + 1
            }
        }
        if minP > 0.0 {
            let threshold = minP * w[0]
            for k in 1..<max(keep, 1) where w[k] < threshold {
                keep = k
                break
            }
        }
        var total = 0.0
        for k in 0..<keep { total += w[k] }
        let u = rng.nextDouble() * total
        var acc = 0.0
        for k in 0..<keep {
            acc += w[k]
            if u < acc { return order[k] }
        }
        return order[keep - 1]
    }
}

extension Sampling {
    /// The k first indices under `before`, in order, in O(n log k): a heap whose root is the worst kept.
    static func best(_ n: Int, _ k: Int, _ before: (Int, Int) -> Bool) -> [Int] {
        var heap: [Int] = []
        heap.reserveCapacity(k + 1)
        func siftDown(_ start: Int) {
            var i = start
            while true {
                let l = 2 * i + 1, r = l + 1
                var worst = i
                if l < heap.count && before(heap[worst], heap[l]) { worst = l }
                if r < heap.count && before(heap[worst], heap[r]) { worst = r }
                if worst == i { return }
                heap.swapAt(i, worst)
                i = worst
            }
        }
        func siftUp(_ start: Int) {
            var i = start
            while i > 0 {
                let parent = (i - 1) / 2
                if !before(heap[parent], heap[i]) { return }
                heap.swapAt(i, parent)
                i = parent
            }
        }
        for i in 0..<n {
            if heap.count < k {
                heap.append(i)
                siftUp(heap.count - 1)
            } else if before(i, heap[0]) {
                heap[0] = i
                siftDown(0)
            }
        }
        return heap.sorted(by: before)
    }
}

/// Stops a reply that repeats itself (qwen_mobile.chat_format.LoopGuard; LoopGuard.java).
public struct LoopGuard: Equatable {
    public let maxPeriod: Int, minSpan: Int, minRepeats: Int

    public init(maxPeriod: Int = 64, minSpan: Int = 64, minRepeats: Int = 4) {
        self.maxPeriod = maxPeriod
        self.minSpan = minSpan
        self.minRepeats = minRepeats
    }

    public init(json m: [String: Any]) throws {
        self.init(maxPeriod: try J.int(m["max_period"], "max_period"), minSpan: try J.int(m["min_span"], "min_span"),
                  minRepeats: try J.int(m["min_repeats"], "min_repeats"))
    }

    public func looping(_ tokens: [Int]) -> Bool {
        let n = tokens.count
        guard maxPeriod >= 1 else { return false }
        for period in 1...maxPeriod {
            let need = max(minSpan, (minRepeats - 1) * period)
            if need + period > n { break }
            var repeating = true
            for j in 0..<need where tokens[n - 1 - j] != tokens[n - 1 - j - period] {
                repeating = false
                break
            }
            if repeating { return true }
        }
        return false
    }
}

/// The manifest's `generation`.
public struct Generation {
    public let defaultMode: String
    public let modes: [String: Sampling]
    public let maxNewTokens: Int
    public let loopGuard: LoopGuard

    public init(_ m: [String: Any]) throws {
        defaultMode = try J.str(m["default_mode"], "generation.default_mode")
        var modes: [String: Sampling] = [:]
        for (name, value) in try J.obj(m["modes"], "generation.modes") {
            modes[name] = try Sampling(json: J.obj(value, "generation.modes.\(name)"))
        }
        guard modes["non_thinking"] != nil, modes[defaultMode] != nil else {
            throw JSONError("generation.modes: needs non_thinking and the default mode \(defaultMode)")
        }
        self.modes = modes
        maxNewTokens = try J.int(m["max_new_tokens"], "generation.max_new_tokens")
        loopGuard = try LoopGuard(json: J.obj(m["loop_guard"], "generation.loop_guard"))
    }

    public func sampling(_ enableThinking: Bool?, _ format: ChatFormat?) -> Sampling {
        var name = enableThinking == nil ? defaultMode : (enableThinking! && modes["thinking"] != nil ? "thinking" : "non_thinking")
        if let format, format.thinking == nil { name = "non_thinking" }
        return modes[name]!
    }
}
