import Foundation
import Tokenizers

/// A bundle's tokenizer.json through swift-transformers' Tokenizers (the golden tests hold it to
/// the Python tokenizers library on the embedded tokenizer and on Qwen3.5's pre-tokenizer).
public final class HFTokenizer: TextTokenizer {
    private let tokenizer: any Tokenizer

    /// `folder` holds tokenizer.json and tokenizer_config.json (a bundle does).
    public init(folder: URL) async throws {
        tokenizer = try await AutoTokenizer.from(modelFolder: folder)
    }

    public func encode(_ text: String) -> [Int] {
        tokenizer.encode(text: text, addSpecialTokens: false)
    }

    public func decode(_ ids: [Int], skipSpecial: Bool) -> String {
        tokenizer.decode(tokens: ids, skipSpecialTokens: skipSpecial)
    }
}
