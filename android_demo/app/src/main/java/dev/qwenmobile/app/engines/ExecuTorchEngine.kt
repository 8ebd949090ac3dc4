package dev.qwenmobile.app.engines

import dev.qwenmobile.core.Engine
import dev.qwenmobile.core.Manifest
import java.io.File
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor

/**
 * An ExecuTorch bundle through executorch-android's step-level [Module]: one `forward(tokens int64
 * [1, T], input_pos int64 [1]) -> logits [1, vocab]` call per prefill chunk or decode token. The
 * state lives inside the program (a call at input_pos 0 starts a new sequence), so it cannot be
 * copied: regenerate re-prefills (see Conversation).
 *
 * Why not executorch's LlmModule: it brings its own tokenizer loading, prompt handling and sampler
 * in C++, and restarts from a prompt string. The app needs the bundle's own tokenizer, chat_format
 * and generation settings, identical tokens to the Python runner (the core's replay tests), and
 * multi-turn chat that continues from the program's state, which step-level calls give.
 */
class ExecuTorchEngine(artifact: File, private val manifest: Manifest) : Engine {
    private val module: Module
    private val inputPos = LongArray(1)
    private val posShape = longArrayOf(1)

    init {
        val forward = manifest.methods["forward"] ?: throw IllegalArgumentException("the manifest has no forward method")
        require(forward.input("tokens").dtype == "int64" && forward.input("input_pos").dtype == "int64") {
            "forward takes ${forward.input("tokens").dtype} tokens; this engine feeds int64"
        }
        module = Module.load(artifact.absolutePath, Module.LOAD_MODE_MMAP)
        val status = module.loadMethod("forward")
        check(status == 0) { "${artifact.name}: ExecuTorch could not load forward (error $status)" }
    }

    override fun maxContext(): Int = manifest.maxContext

    override fun maxChunk(): Int = manifest.maxSeqLen

    override fun step(tokens: IntArray, start: Int): FloatArray {
        require(tokens.size in 1..manifest.maxSeqLen && start + tokens.size <= manifest.maxContext) {
            "${tokens.size} tokens at $start do not fit (1..${manifest.maxSeqLen} per call, ${manifest.maxContext} in all)"
        }
        val ids = LongArray(tokens.size) { tokens[it].toLong() }
        inputPos[0] = start.toLong()
        val outputs = module.forward(
            EValue.from(Tensor.fromBlob(ids, longArrayOf(1, ids.size.toLong()))),
            EValue.from(Tensor.fromBlob(inputPos, posShape)),
        )
        return outputs[0].toTensor().dataAsFloatArray
    }

    override fun close() {
        module.destroy()
    }
}
