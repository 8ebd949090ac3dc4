import CoreML
import Foundation
import QwenMobileKit

/// A Core ML bundle (iOS 18): the package's `prefill(tokens int32 [1, C], input_pos, length)` and
/// `decode(tokens [1, 1], input_pos)` functions, each loaded as an MLModel with
/// MLModelConfiguration.functionName, sharing one MLState made by make_state(). The state can be
/// read and written through MLState.withMultiArray, so regenerate restores a snapshot.
final class CoreMLEngine: Engine {
    let maxContext: Int
    let maxChunk: Int
    private let prefill: MLModel
    private let decode: MLModel
    private var state: MLState
    private let stateNames: [String]

    init(bundle: URL, manifest: Manifest) async throws {
        for method in ["prefill", "decode"] {
            guard manifest.methods[method]?.input("tokens")?.dtype == "int32" else {
                throw Manifest.BundleError("\(method): tokens must be int32 for this engine")
            }
        }
        let compiled = try await CoreMLEngine.compiledModel(bundle.appendingPathComponent(manifest.artifact), manifest: manifest)
        func load(_ function: String) async throws -> MLModel {
            let configuration = MLModelConfiguration()
            configuration.computeUnits = .cpuAndNeuralEngine
            configuration.functionName = function
            return try await MLModel.load(contentsOf: compiled, configuration: configuration)
        }
        prefill = try await load("prefill")
        decode = try await load("decode")
        state = decode.makeState()
        stateNames = Array(decode.modelDescription.stateDescriptionsByName.keys).sorted()
        maxContext = manifest.maxContext
        maxChunk = try manifest.methods["prefill"]!.input("tokens")!.fixedShape()[1]
    }

    /// Core ML compiles a .mlpackage on the device; the result is kept in Caches per bundle digest.
    static func compiledModel(_ package: URL, manifest: Manifest) async throws -> URL {
        let key = manifest.files.first { $0.0.hasPrefix(manifest.artifact + "/") && $0.0.hasSuffix(".mlmodel") }?.1.sha256 ?? "model"
        let caches = try FileManager.default.url(for: .cachesDirectory, in: .userDomainMask, appropriateFor: nil, create: true)
        let target = caches.appendingPathComponent("\(key.prefix(16)).mlmodelc")
        if FileManager.default.fileExists(atPath: target.path) { return target }
        let compiled = try await MLModel.compileModel(at: package)
        try? FileManager.default.removeItem(at: target)
        try FileManager.default.moveItem(at: compiled, to: target)
        return target
    }

    func step(_ tokens: [Int], start: Int) throws -> [Float] {
        guard (1...maxChunk).contains(tokens.count), start + tokens.count <= maxContext else {
            throw Manifest.BundleError("\(tokens.count) tokens at \(start) do not fit (1...\(maxChunk) per call, \(maxContext) in all)")
        }
        if start == 0 { state = decode.makeState() } // a new sequence starts from a fresh (zeroed) state
        let position = try MLMultiArray(shape: [1], dataType: .int32)
        position[0] = NSNumber(value: start)
        let output: MLFeatureProvider
        if tokens.count == 1 {
            let ids = try MLMultiArray(shape: [1, 1], dataType: .int32)
            ids[0] = NSNumber(value: tokens[0])
            let input = try MLDictionaryFeatureProvider(dictionary: ["tokens": ids, "input_pos": position])
            output = try decode.prediction(from: input, using: state)
        } else {
            let ids = try MLMultiArray(shape: [1, NSNumber(value: maxChunk)], dataType: .int32)
            ids.withUnsafeMutableBufferPointer(ofType: Int32.self) { buffer, _ in
                for k in 0..<buffer.count { buffer[k] = k < tokens.count ? Int32(tokens[k]) : 0 }
            }
            let length = try MLMultiArray(shape: [1], dataType: .int32)
            length[0] = NSNumber(value: tokens.count)
            let input = try MLDictionaryFeatureProvider(dictionary: ["tokens": ids, "input_pos": position, "length": length])
            output = try prefill.prediction(from: input, using: state)
        }
        guard let logits = output.featureValue(for: "logits")?.multiArrayValue else {
            throw Manifest.BundleError("the model gave no logits")
        }
        return CoreMLEngine.floats(logits)
    }

    static func floats(_ array: MLMultiArray) -> [Float] {
        switch array.dataType {
        case .float16:
            return array.withUnsafeBufferPointer(ofType: Float16.self) { $0.map { Float($0) } }
        case .float32:
            return array.withUnsafeBufferPointer(ofType: Float.self) { Array($0) }
        default:
            return (0..<array.count).map { array[$0].floatValue }
        }
    }

    var canSnapshot: Bool { true }

    func snapshot() throws -> Any {
        var copies: [String: Data] = [:]
        for name in stateNames {
            state.withMultiArray(for: name) { array in
                array.withUnsafeMutableBytes { bytes, _ in copies[name] = Data(bytes) }
            }
        }
        return copies
    }

    func restore(_ snapshot: Any) throws {
        guard let copies = snapshot as? [String: Data] else { throw Manifest.BundleError("not a Core ML state snapshot") }
        for (name, data) in copies {
            state.withMultiArray(for: name) { array in
                array.withUnsafeMutableBytes { bytes, _ in data.copyBytes(to: bytes.bindMemory(to: UInt8.self)) }
            }
        }
    }
}
