import ExecuTorch
import Foundation
import QwenMobileKit

/// An ExecuTorch bundle through ExecuTorch's Swift Module: one `forward(tokens int64 [1, T],
/// input_pos int64 [1]) -> logits [1, vocab]` call per prefill chunk or decode token. The state
/// lives inside the program, so regenerate re-prefills (Conversation does it).
final class ExecuTorchEngine: QwenMobileKit.Engine {
    let maxContext: Int
    let maxChunk: Int
    private let module: Module

    init(bundle: URL, manifest: Manifest) throws {
        guard manifest.methods["forward"]?.input("tokens")?.dtype == "int64" else {
            throw Manifest.BundleError("forward: tokens must be int64 for this engine")
        }
        module = Module(filePath: bundle.appendingPathComponent(manifest.artifact).path)
        try module.load("forward")
        maxContext = manifest.maxContext
        maxChunk = manifest.maxSeqLen
    }

    func step(_ tokens: [Int], start: Int) throws -> [Float] {
        guard (1...maxChunk).contains(tokens.count), start + tokens.count <= maxContext else {
            throw Manifest.BundleError("\(tokens.count) tokens at \(start) do not fit (1...\(maxChunk) per call, \(maxContext) in all)")
        }
        let ids = Tensor<Int64>(tokens.map { Int64($0) }, shape: [1, tokens.count])
        let position = Tensor<Int64>([Int64(start)], shape: [1])
        let outputs = try module.forward([ids, position])
        guard let logits: Tensor<Float> = outputs.first?.tensor() else { throw Manifest.BundleError("forward gave no logits") }
        return logits.scalars()
    }
}
