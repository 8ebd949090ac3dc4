import Foundation
import QwenMobileKit

struct BundleInfo: Identifiable, Hashable {
    let url: URL
    let name: String
    let backend: String
    let quant: String
    var id: URL { url }
}

struct ChatLine: Identifiable {
    let id = UUID()
    let role: String
    var text: String
    var thinking: String = ""
    var stats: String = ""
}

/// Finds bundles in the app's Documents/bundles (copied there with Finder or the Files app),
/// verifies and loads one (engine by the manifest's backend), and runs the chat on one serial
/// queue; tokens stream into `lines` as they are sampled.
@MainActor
final class ChatModel: ObservableObject {
    @Published var bundles: [BundleInfo] = []
    @Published var loaded: BundleInfo?
    @Published var status = ""
    @Published var lines: [ChatLine] = []
    @Published var generating = false
    @Published var canThink = false
    @Published var thinking = false
    @Published var tokensPerSecond = 0.0
    @Published var contextUsed = 0
    @Published var contextSize = 0
    @Published var canRegenerate = false

    private let queue = DispatchQueue(label: "engine")
    private var engine: Engine?
    private var manifest: Manifest?
    private var tokenizer: HFTokenizer?
    private var conversation: Conversation?
    private var seed = UInt64(Date().timeIntervalSince1970 * 1000)
    private var cancel = false
    private let lock = NSLock()

    var root: URL {
        FileManager.default.urls(for: .documentDirectory, in: .userDomainMask)[0].appendingPathComponent("bundles")
    }

    init() { refresh() }

    func refresh() {
        try? FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        let dirs = (try? FileManager.default.contentsOfDirectory(at: root, includingPropertiesForKeys: nil)) ?? []
        bundles = dirs.filter { FileManager.default.fileExists(atPath: $0.appendingPathComponent(Manifest.file).path) }
            .sorted { $0.lastPathComponent < $1.lastPathComponent }
            .map { url in
                do {
                    let m = try Manifest.read(bundle: url)
                    return BundleInfo(url: url, name: url.lastPathComponent, backend: m.backend, quant: m.quantScheme)
                } catch {
                    return BundleInfo(url: url, name: url.lastPathComponent, backend: "unreadable: \(error)", quant: "")
                }
            }
        if bundles.isEmpty && loaded == nil {
            status = "No bundle found. Copy one into Documents/bundles/NAME with Finder or the Files app (see README)."
        }
    }

    func load(_ bundle: BundleInfo) {
        guard !generating else { return }
        loaded = nil
        lines = []
        status = "Checking \(bundle.name)…"
        Task {
            do {
                let m = try Manifest.read(bundle: bundle.url)
                try await verify(bundle, m)
                status = "Loading \(bundle.name)…"
                let engine: Engine
                switch m.backend {
                case "coreml": engine = try await CoreMLEngine(bundle: bundle.url, manifest: m)
                case "executorch": engine = try ExecuTorchEngine(bundle: bundle.url, manifest: m)
                default: throw Manifest.BundleError("\(m.backend) bundles run on Android; this app runs coreml and executorch")
                }
                self.tokenizer = try await HFTokenizer(folder: bundle.url)
                self.engine = engine
                self.manifest = m
                canThink = m.chatFormat?.thinking != nil
                thinking = canThink && m.chatFormat!.thinkingOn(nil)
                loaded = bundle
                status = m.chatFormat == nil ? "This bundle's chat template has no chat_format; re-export it." : ""
                newChat()
            } catch {
                status = "\(bundle.name): \(error)"
            }
        }
    }

    /// SHA-256 of every file, skipped when the same files (sizes, dates) were verified before.
    private func verify(_ bundle: BundleInfo, _ m: Manifest) async throws {
        let fingerprint = m.files.map { name, _ -> String in
            let attributes = try? FileManager.default.attributesOfItem(atPath: bundle.url.appendingPathComponent(name).path)
            return "\(name):\(attributes?[.size] ?? 0):\((attributes?[.modificationDate] as? Date)?.timeIntervalSince1970 ?? 0)"
        }.joined(separator: "|")
        let key = "verified:" + bundle.url.path
        if UserDefaults.standard.string(forKey: key) == fingerprint { return }
        try await withCheckedThrowingContinuation { (done: CheckedContinuation<Void, Error>) in
            queue.async {
                do {
                    try m.verifyFiles(bundle: bundle.url) { bytes, total in
                        let percent = bytes * 100 / max(total, 1)
                        Task { @MainActor in self.status = "Verifying \(bundle.name): \(percent)%" }
                    }
                    done.resume()
                } catch {
                    done.resume(throwing: error)
                }
            }
        }
        UserDefaults.standard.set(fingerprint, forKey: key)
    }

    func newChat() {
        guard let m = manifest, let engine, let tokenizer, let format = m.chatFormat, !generating else { return }
        let enable: Bool? = canThink ? thinking : nil
        seed += 1
        conversation = Conversation(engine: engine, format: format, tokenizer: tokenizer, stopIds: m.eos,
                                    sampling: m.generation.sampling(enable, format), seed: seed, system: nil,
                                    enableThinking: enable, maxNewTokens: m.generation.maxNewTokens,
                                    loopGuard: m.generation.loopGuard)
        lines = []
        canRegenerate = false
        contextUsed = 0
        contextSize = conversation!.contextSize
    }

    func setThinking(_ on: Bool) {
        thinking = on
        guard let m = manifest, let chat = conversation else { return }
        chat.enableThinking = on
        chat.sampling = m.generation.sampling(on, m.chatFormat)
    }

    func send(_ text: String) {
        guard let chat = conversation, !generating, !text.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty else { return }
        lines.append(ChatLine(role: "user", text: text))
        run { listener, cancelled in try chat.say(text, onToken: listener, cancelled: cancelled) }
    }

    func regenerate() {
        guard let chat = conversation, !generating, chat.canRegenerate else { return }
        lines.removeLast()
        run { listener, cancelled in try chat.regenerate(onToken: listener, cancelled: cancelled) }
    }

    func stop() {
        lock.lock()
        cancel = true
        lock.unlock()
    }

    private func run(_ turn: @escaping (@escaping (Int) -> Void, @escaping () -> Bool) throws -> Conversation.Reply) {
        guard let tokenizer, let format = manifest?.chatFormat else { return }
        let thinkingOn = canThink && thinking
        lock.lock()
        cancel = false
        lock.unlock()
        generating = true
        lines.append(ChatLine(role: "assistant", text: ""))
        queue.async { [weak self] in
            guard let self else { return }
            var ids: [Int] = []
            let started = Date()
            let cancelled: () -> Bool = {
                self.lock.lock()
                defer { self.lock.unlock() }
                return self.cancel
            }
            do {
                let reply = try turn({ token in
                    ids.append(token)
                    let text = tokenizer.decode(ids, skipSpecial: true)
                    guard !text.hasSuffix("\u{FFFD}") else { return } // a character split across tokens
                    let rate = Double(ids.count) / max(Date().timeIntervalSince(started), 1e-6)
                    Task { @MainActor in self.show(format, thinkingOn, text, "", rate) }
                }, cancelled)
                let finish: String
                switch reply.finish {
                case .stop: finish = ""
                case .length: finish = " · stopped at the reply limit"
                case .context: finish = " · the context is full"
                case .loop: finish = " · stopped: the reply was repeating itself"
                case .cancelled: finish = " · stopped"
                }
                let stats = String(format: "%d tokens · prefill %d tok %.1f tok/s · decode %.1f tok/s", reply.tokens.count,
                                   reply.promptTokens, reply.prefillTokensPerSecond, reply.decodeTokensPerSecond)
                    + (reply.rebuilt ? " · older turns dropped" : "") + finish
                let text = tokenizer.decode(reply.tokens, skipSpecial: true)
                Task { @MainActor in
                    self.show(format, thinkingOn, text, stats, reply.decodeTokensPerSecond)
                    self.finished()
                }
            } catch {
                Task { @MainActor in
                    self.status = "Generation failed: \(error)"
                    self.finished()
                }
            }
        }
    }

    private func finished() {
        generating = false
        canRegenerate = conversation?.canRegenerate ?? false
        contextUsed = conversation?.fed.count ?? 0
    }

    private func show(_ format: ChatFormat, _ thinkingOn: Bool, _ text: String, _ stats: String, _ rate: Double) {
        let (thought, answer) = format.splitThinking(thinkingOn, text)
        guard !lines.isEmpty else { return }
        lines[lines.count - 1].text = answer
        lines[lines.count - 1].thinking = thought
        lines[lines.count - 1].stats = stats
        tokensPerSecond = rate
    }
}
