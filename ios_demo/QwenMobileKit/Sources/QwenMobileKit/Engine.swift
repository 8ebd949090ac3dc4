import Foundation

/// A loaded artifact: feed token ids at positions start..., get the last position's logits
/// (android_demo/core Engine.java). A call at start 0 begins a new sequence.
public protocol Engine: AnyObject {
    var maxContext: Int { get }
    /// The most tokens one call takes (the manifest's max_seq_len).
    var maxChunk: Int { get }
    func step(_ tokens: [Int], start: Int) throws -> [Float]
    /// Whether `snapshot` can copy the state (Core ML: yes, through MLState; ExecuTorch: no).
    var canSnapshot: Bool { get }
    func snapshot() throws -> Any
    func restore(_ snapshot: Any) throws
}

public extension Engine {
    var canSnapshot: Bool { false }
    func snapshot() throws -> Any { throw JSONError("this engine cannot copy its state") }
    func restore(_ snapshot: Any) throws { throw JSONError("this engine cannot copy its state") }
}

/// Text to ids and back; special tokens are neither added on encode nor skipped on decode unless asked.
public protocol TextTokenizer {
    func encode(_ text: String) -> [Int]
    func decode(_ ids: [Int], skipSpecial: Bool) -> String
}
