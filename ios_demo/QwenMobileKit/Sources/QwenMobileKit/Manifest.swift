import CryptoKit
import Foundation

/// A bundle's manifest.json (format_version 2), read and checked (android_demo/core Manifest.java).
public struct Manifest {
    public static let formatVersion = 2
    public static let file = "manifest.json"

    public struct BundleError: Error, CustomStringConvertible {
        public let description: String
        public init(_ description: String) { self.description = description }
    }

    public struct Tensor {
        public let name: String, dtype: String
        public let shape: [Any] // Int, or a String naming a dynamic dimension

        public func fixedShape() throws -> [Int] {
            try shape.enumerated().map { k, d in
                guard let n = d as? NSNumber else { throw BundleError("\(name): dimension \(k) is dynamic") }
                return n.intValue
            }
        }
    }

    public struct Method {
        public var inputs: [Tensor] = [], outputs: [Tensor] = []
        public func input(_ name: String) -> Tensor? { inputs.first { $0.name == name } }
        public func output(_ name: String) -> Tensor? { outputs.first { $0.name == name } }
    }

    public struct FileEntry {
        public let bytes: Int64
        public let sha256: String
    }

    public let backend: String, artifact: String, quantScheme: String
    public let vocabSize: Int, maxContext: Int, maxSeqLen: Int
    public let bos: Int?
    public let eos: [Int]
    public let chatFormat: ChatFormat?
    public let generation: Generation
    public let files: [(String, FileEntry)]
    public let methods: [String: Method]
    public let stateFeeds: [String: String]

    public static func read(bundle: URL) throws -> Manifest {
        let url = bundle.appendingPathComponent(file)
        guard FileManager.default.fileExists(atPath: url.path) else { throw BundleError("\(url.path): not found (is this a qwen-mobile bundle?)") }
        return try parse(Data(contentsOf: url))
    }

    public static func parse(_ data: Data) throws -> Manifest {
        do {
            return try Manifest(J.obj(J.parse(data), "manifest"))
        } catch let error as JSONError {
            throw BundleError("\(Manifest.file): \(error.description)")
        }
    }

    init(_ m: [String: Any]) throws {
        let version = (m["format_version"] as? NSNumber)?.intValue ?? -1
        guard version == Manifest.formatVersion else {
            throw BundleError("\(Manifest.file): format_version \(version); this app reads format_version \(Manifest.formatVersion) (re-export the bundle)")
        }
        backend = try J.str(m["backend"], "backend")
        artifact = try J.str(m["artifact"], "artifact")
        guard !artifact.isEmpty, !artifact.contains("/"), !artifact.hasPrefix(".") else {
            throw BundleError("\(Manifest.file): artifact \(artifact) is not a plain name inside the bundle")
        }
        vocabSize = try J.int(m["vocab_size"], "vocab_size")
        maxContext = try J.int(m["max_context"], "max_context")
        maxSeqLen = try J.int(m["max_seq_len"], "max_seq_len")
        guard vocabSize > 0, maxContext > 0, (1...maxContext).contains(maxSeqLen) else {
            throw BundleError("\(Manifest.file): vocab_size, max_context and max_seq_len must be positive, max_seq_len at most max_context")
        }
        let special = try J.obj(m["special_tokens"], "special_tokens")
        bos = try J.isNull(special["bos"]) ? nil : J.int(special["bos"], "special_tokens.bos")
        eos = try J.ints(special["eos"], "special_tokens.eos")
        guard !eos.isEmpty else { throw BundleError("\(Manifest.file): special_tokens.eos is empty") }
        chatFormat = try J.isNull(m["chat_format"]) ? nil : ChatFormat(J.obj(m["chat_format"], "chat_format"))
        generation = try Generation(J.obj(m["generation"], "generation"))
        quantScheme = try J.str(J.obj(m["quant"], "quant")["scheme"], "quant.scheme")
        guard try J.bool(J.obj(m["parity"], "parity")["passed"], "parity.passed") else {
            throw BundleError("\(Manifest.file): parity.passed is false: the artifact did not match the reference at export")
        }
        var files: [(String, FileEntry)] = []
        for (name, value) in try J.obj(m["files"], "files").sorted(by: { $0.key < $1.key }) {
            guard !name.isEmpty, !name.hasPrefix("/"), !name.split(separator: "/").contains(".."), name != Manifest.file else {
                throw BundleError("\(Manifest.file): files: \(name) is not a relative path inside the bundle")
            }
            let f = try J.obj(value, "files.\(name)")
            let sha = try J.str(f["sha256"], "files.\(name).sha256")
            guard sha.count == 64, sha.allSatisfy({ $0.isHexDigit && !$0.isUppercase }) else {
                throw BundleError("\(Manifest.file): files.\(name).sha256 is not a SHA-256 hex digest")
            }
            files.append((name, FileEntry(bytes: try J.num(f["bytes"], "files.\(name).bytes").int64Value, sha256: sha)))
        }
        guard files.contains(where: { $0.0 == artifact || $0.0.hasPrefix(artifact + "/") }) else {
            throw BundleError("\(Manifest.file): files does not list the artifact \(artifact)")
        }
        self.files = files
        var methods: [String: Method] = [:]
        for (name, value) in try J.obj(m["methods"], "methods") {
            let method = try J.obj(value, "methods.\(name)")
            var parsed = Method()
            for t in try J.arr(method["inputs"], "methods.\(name).inputs") {
                let tensor = try J.obj(t, "input")
                parsed.inputs.append(Tensor(name: try J.str(tensor["name"], "name"), dtype: try J.str(tensor["dtype"], "dtype"),
                                            shape: try J.arr(tensor["shape"], "shape")))
            }
            for t in try J.arr(method["outputs"], "methods.\(name).outputs") {
                let tensor = try J.obj(t, "output")
                guard tensor["name"] != nil else { continue } // constant methods: {"value": ...}
                parsed.outputs.append(Tensor(name: try J.str(tensor["name"], "name"), dtype: try J.str(tensor["dtype"], "dtype"),
                                             shape: try J.arr(tensor["shape"], "shape")))
            }
            methods[name] = parsed
        }
        self.methods = methods
        var feeds: [String: String] = [:]
        if !J.isNull(m["state_feeds"]) {
            for (output, input) in try J.obj(m["state_feeds"], "state_feeds") { feeds[output] = try J.str(input, "state_feeds.\(output)") }
        }
        stateFeeds = feeds
        try checkBackend()
    }

    private func checkBackend() throws {
        func require(_ name: String, _ inputs: [String]) throws {
            guard let method = methods[name] else { throw BundleError("\(Manifest.file): methods has no \(name) (the \(backend) artifact needs it)") }
            for input in inputs where method.input(input) == nil { throw BundleError("\(Manifest.file): methods.\(name) has no input \(input)") }
            guard method.output("logits") != nil else { throw BundleError("\(Manifest.file): methods.\(name) has no output logits") }
        }
        switch backend {
        case "executorch": try require("forward", ["tokens", "input_pos"])
        case "coreml", "tflite":
            try require("prefill", ["tokens", "input_pos", "length"])
            try require("decode", ["tokens", "input_pos"])
        default: throw BundleError("\(Manifest.file): backend \(backend) is not one this app runs (executorch, coreml)")
        }
    }

    /// Checks every listed file: present, of its size, with its SHA-256; throws naming the first that differs.
    public func verifyFiles(bundle: URL, progress: ((Int64, Int64) -> Void)? = nil) throws {
        let total = files.reduce(Int64(0)) { $0 + $1.1.bytes }
        var done: Int64 = 0
        for (name, entry) in files {
            let url = bundle.appendingPathComponent(name)
            guard let attributes = try? FileManager.default.attributesOfItem(atPath: url.path),
                  (attributes[.type] as? FileAttributeType) == .typeRegular else {
                throw BundleError("\(name): missing from the bundle")
            }
            let size = (attributes[.size] as? NSNumber)?.int64Value ?? -1
            guard size == entry.bytes else { throw BundleError("\(name): \(size) bytes, the manifest says \(entry.bytes) (incomplete copy?)") }
            let handle = try FileHandle(forReadingFrom: url)
            defer { try? handle.close() }
            var hasher = SHA256()
            while let block = try handle.read(upToCount: 1 << 20), !block.isEmpty {
                hasher.update(data: block)
                done += Int64(block.count)
                progress?(done, total)
            }
            let digest = hasher.finalize().map { String(format: "%02x", $0) }.joined()
            guard digest == entry.sha256 else {
                throw BundleError("\(name): SHA-256 \(digest.prefix(12))… differs from the manifest's \(entry.sha256.prefix(12))… (the file was changed or corrupted)")
            }
        }
    }
}
