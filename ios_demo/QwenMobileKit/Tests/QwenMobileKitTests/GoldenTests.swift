import Foundation
import XCTest
@testable import QwenMobileKit

/// The same golden files the Java core is tested on (android_demo/core/testdata/goldens, written by
/// scripts/app_goldens.py from the Python tokenizers library, Jinja and the ExecuTorch runner).
enum Goldens {
    static let dir = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("android_demo/core/testdata/goldens")

    static func json(_ name: String) throws -> Any {
        try J.parse(Data(contentsOf: dir.appendingPathComponent(name)))
    }

    static func floats(_ bits: Any?) throws -> [Float] {
        try J.ints(bits, "logits_bits").map { Float(bitPattern: UInt32(truncatingIfNeeded: $0)) }
    }

    /// A folder holding `tokenizerFile` as tokenizer.json, for AutoTokenizer.from(modelFolder:).
    static func tokenizerFolder(_ tokenizerFile: String) throws -> URL {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent(UUID().uuidString)
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        try FileManager.default.copyItem(at: dir.appendingPathComponent(tokenizerFile), to: folder.appendingPathComponent("tokenizer.json"))
        try FileManager.default.copyItem(at: dir.appendingPathComponent("tokenizer_config.json"),
                                         to: folder.appendingPathComponent("tokenizer_config.json"))
        return folder
    }
}

final class TokenizerGoldenTests: XCTestCase {
    func check(_ tokenizerFile: String, _ key: String) async throws {
        let tokenizer = try await HFTokenizer(folder: Goldens.tokenizerFolder(tokenizerFile))
        let cases = try J.arr(J.obj(Goldens.json("tokenizer_cases.json"), "golden")["cases"], "cases")
        var failures: [String] = []
        for c in cases {
            let m = try J.obj(c, "case")
            let text = try J.str(m["text"], "text")
            let expected = try J.ints(m[key], key)
            let got = tokenizer.encode(text)
            if got != expected { failures.append("encode \(text.debugDescription): tokenizers \(expected), swift \(got)"); continue }
            if tokenizer.decode(got, skipSpecial: false) != (m[key + "_decoded"] as? String) { failures.append("decode \(text.debugDescription)") }
            if tokenizer.decode(got, skipSpecial: true) != (m[key + "_decoded_skip"] as? String) { failures.append("decode skipping specials \(text.debugDescription)") }
        }
        XCTAssert(failures.isEmpty, "\(failures.count) of \(cases.count) differ:\n" + failures.prefix(8).joined(separator: "\n"))
    }

    func testEmbeddedTokenizerMatchesTokenizers() async throws { try await check("tokenizer.json", "embedded") }

    func testQwen35PreTokenizerMatchesTokenizers() async throws { try await check("tokenizer_qwen35_pattern.json", "qwen35") }
}

final class ChatFormatGoldenTests: XCTestCase {
    func testRendersAsTheTemplatesDo() throws {
        let golden = try J.obj(Goldens.json("chat_cases.json"), "golden")
        var checked = 0
        for (name, value) in golden {
            let entry = try J.obj(value, name)
            let format = try ChatFormat(J.obj(entry["chat_format"], "chat_format"))
            for c in try J.arr(entry["cases"], "cases") {
                let m = try J.obj(c, "case")
                let messages = try J.arr(m["messages"], "messages").map { item -> ChatFormat.Message in
                    let message = try J.obj(item, "message")
                    return ChatFormat.Message(role: try J.str(message["role"], "role"), content: try J.str(message["content"], "content"))
                }
                let rendered = try format.render(messages, addGenerationPrompt: try J.bool(m["add_generation_prompt"], "gen"),
                                                 enableThinking: m["enable_thinking"] as? Bool)
                XCTAssertEqual(rendered, m["rendered"] as? String, "\(name): \(messages)")
                checked += 1
            }
        }
        XCTAssertGreaterThan(checked, 200)
    }
}

final class SamplerGoldenTests: XCTestCase {
    func testSplitMix64() {
        var rng = SplitMix64(seed: 0)
        XCTAssertEqual(rng.nextLong(), 0xE220_A839_7B1D_CDAF)
        XCTAssertEqual(rng.nextLong(), 0x6E78_9E6A_A1B9_65F4)
    }

    func testSamplesAsPythonDoes() throws {
        for c in try J.arr(Goldens.json("sampler_cases.json"), "cases") {
            let m = try J.obj(c, "case")
            let logits = try Goldens.floats(m["logits_bits"])
            var counts: [Int: Int] = [:]
            for (k, v) in try J.obj(m["counts"], "counts") { counts[Int(k)!] = try J.int(v, "count") }
            let sampling = try Sampling(json: J.obj(m["sampling"], "sampling"))
            var rng = SplitMix64(seed: UInt64(try J.str(m["seed"], "seed"))!)
            let picks = (0..<8).map { _ in sampling.sample(logits, counts: counts, rng: &rng) }
            XCTAssertEqual(picks, try J.ints(m["picks"], "picks"), "\(sampling)")
        }
    }

    func testLoopGuardAgreesWithPython() throws {
        for c in try J.arr(Goldens.json("loop_guard_cases.json"), "cases") {
            let m = try J.obj(c, "case")
            let guardian = try LoopGuard(json: J.obj(m["guard"], "guard"))
            XCTAssertEqual(guardian.looping(try J.ints(m["tokens"], "tokens")), try J.bool(m["looping"], "looping"))
        }
    }
}

/// Replays the Python runner's logits and asserts it is fed the recorded ids at the recorded positions.
final class ReplayEngine: Engine {
    let calls: [[String: Any]]
    let vocab: Int
    let maxContext: Int
    let maxChunk: Int
    var next = 0

    init(calls: [[String: Any]], vocab: Int, maxContext: Int, maxChunk: Int) {
        self.calls = calls
        self.vocab = vocab
        self.maxContext = maxContext
        self.maxChunk = maxChunk
    }

    func step(_ tokens: [Int], start: Int) throws -> [Float] {
        guard next < calls.count else { throw JSONError("call \(next) was never recorded: \(tokens) at \(start)") }
        let call = calls[next]
        let expected = try J.ints(call["tokens"], "tokens"), expectedStart = try J.int(call["start"], "start")
        guard expected == tokens, expectedStart == start else {
            throw JSONError("call \(next): fed \(tokens) at \(start), recorded \(expected) at \(expectedStart)")
        }
        next += 1
        var logits = [Float](repeating: -.infinity, count: vocab)
        for (id, value) in zip(try J.ints(call["ids"], "ids"), try Goldens.floats(call["logits_bits"])) { logits[id] = value }
        return logits
    }
}

final class ReplayTests: XCTestCase {
    func replay(_ name: String) async throws {
        let golden = try J.obj(Goldens.json("replay_\(name).json"), "golden")
        let engineJson = try J.obj(golden["engine"], "engine")
        let engine = ReplayEngine(calls: try J.arr(golden["calls"], "calls").map { try J.obj($0, "call") },
                                  vocab: try J.int(engineJson["vocab_size"], "vocab"),
                                  maxContext: try J.int(engineJson["max_context"], "max_context"),
                                  maxChunk: try J.int(engineJson["max_chunk"], "max_chunk"))
        let tokenizer = try await HFTokenizer(folder: Goldens.tokenizerFolder("tokenizer.json"))
        let chat = Conversation(engine: engine, format: try ChatFormat(J.obj(golden["chat_format"], "chat_format")), tokenizer: tokenizer,
                                stopIds: try J.ints(golden["stop_ids"], "stop_ids"),
                                sampling: try Sampling(json: J.obj(golden["sampling"], "sampling")),
                                seed: UInt64(try J.str(golden["seed"], "seed"))!, system: golden["system"] as? String,
                                enableThinking: nil, maxNewTokens: 1,
                                loopGuard: try LoopGuard(json: J.obj(golden["loop_guard"], "loop_guard")),
                                maxContext: (golden["max_context"] as? NSNumber)?.intValue ?? 0)
        for (index, t) in try J.arr(golden["turns"], "turns").enumerated() {
            let turn = try J.obj(t, "turn")
            chat.maxNewTokens = try J.int(turn["max_new_tokens"], "max_new_tokens")
            if turn.keys.contains("enable_thinking") { chat.enableThinking = turn["enable_thinking"] as? Bool }
            let reply = (turn["regenerate"] as? Bool) == true ? try chat.regenerate() : try chat.say(try J.str(turn["user"], "user"))
            let expect = try J.obj(turn["expect"], "expect")
            XCTAssertEqual(reply.tokens, try J.ints(expect["tokens"], "tokens"), "\(name) turn \(index)")
            XCTAssertEqual(reply.text, expect["text"] as? String, "\(name) turn \(index)")
            XCTAssertEqual(reply.finish.rawValue, expect["finish"] as? String, "\(name) turn \(index)")
            XCTAssertEqual(reply.promptTokens, try J.int(expect["prompt_tokens"], "prompt_tokens"), "\(name) turn \(index)")
            XCTAssertEqual(reply.rebuilt, try J.bool(expect["rebuilt"], "rebuilt"), "\(name) turn \(index)")
        }
        XCTAssertEqual(engine.next, engine.calls.count, "\(name): every recorded call was made")
        XCTAssertEqual(chat.fed, try J.ints(golden["fed"], "fed"))
    }

    func testGreedy() async throws { try await replay("greedy") }
    func testSampled() async throws { try await replay("sampled") }
    func testContext() async throws { try await replay("context") }
    func testLoop() async throws { try await replay("loop") }
    func testStops() async throws { try await replay("stops") }
    func testThinking() async throws { try await replay("thinking") }
}

final class ManifestTests: XCTestCase {
    func testReadsTheGoldenManifests() throws {
        let m = try Manifest.parse(Data(contentsOf: Goldens.dir.appendingPathComponent("manifest.json")))
        XCTAssertEqual(m.backend, "executorch")
        XCTAssertEqual(m.maxSeqLen, 128)
        XCTAssertEqual(m.chatFormat?.generationPrompt(nil), "<|im_start|>assistant\n")
        let tflite = try Manifest.parse(Data(contentsOf: Goldens.dir.appendingPathComponent("manifest_tflite.json")))
        XCTAssertEqual(tflite.stateFeeds.count, tflite.methods["decode"]!.outputs.count - 1)
    }

    func testVerifyNamesTheFileThatDiffers() throws {
        let golden = try Manifest.parse(Data(contentsOf: Goldens.dir.appendingPathComponent("manifest.json")))
        let bundle = FileManager.default.temporaryDirectory.appendingPathComponent(UUID().uuidString)
        try FileManager.default.createDirectory(at: bundle, withIntermediateDirectories: true)
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            try FileManager.default.copyItem(at: Goldens.dir.appendingPathComponent(name), to: bundle.appendingPathComponent(name))
        }
        XCTAssertThrowsError(try golden.verifyFiles(bundle: bundle)) { error in
            XCTAssertEqual("\(error)", "model.pte: missing from the bundle")
        }
    }

    func testRefusesOlderManifests() throws {
        var text = try String(contentsOf: Goldens.dir.appendingPathComponent("manifest.json"), encoding: .utf8)
        text = text.replacingOccurrences(of: "\"format_version\": 2", with: "\"format_version\": 1")
        XCTAssertThrowsError(try Manifest.parse(Data(text.utf8)))
    }
}
