package dev.qwenmobile.app.engines

import dev.qwenmobile.core.Engine
import dev.qwenmobile.core.Manifest
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import org.tensorflow.lite.Interpreter

/**
 * A TFLite bundle through LiteRT's [Interpreter] and its signature runners: `prefill(tokens int32
 * [1, C], input_pos, length, <state>)` for chunks of 2..C tokens (padded to C), `decode(tokens
 * [1, 1], input_pos, <state>)` for one. Every state output is fed back as the input the manifest's
 * `state_feeds` names on the next call; no state name is hard-coded. The state is plain buffers,
 * so it can be copied: regenerate restores a snapshot instead of prefilling again.
 */
class LiteRtEngine(artifact: File, private val manifest: Manifest, threads: Int) : Engine {
    private val interpreter: Interpreter
    private val chunk: Int
    private val vocab = manifest.vocabSize
    private val feeds: Map<String, String> = manifest.stateFeeds // output -> input it feeds
    private var state: Map<String, ByteBuffer>  // by input name
    private var spare: Map<String, ByteBuffer>  // written by the next call, then swapped in
    private val logits = direct(4L * vocab)
    private val prefillTokens: ByteBuffer
    private val decodeToken = direct(4)
    private val position = direct(4)
    private val length = direct(4)

    init {
        val prefill = manifest.methods["prefill"]!!
        val decode = manifest.methods["decode"]!!
        for (name in listOf("tokens", "input_pos", "length")) {
            require(prefill.input(name).dtype == "int32") { "prefill input $name is ${prefill.input(name).dtype}; expected int32" }
        }
        chunk = prefill.input("tokens").fixedShape()[1].toInt()
        prefillTokens = direct(4L * chunk)
        fun buffers() = feeds.values.associateWith { name ->
            val tensor = decode.input(name)
            direct(tensor.fixedShape().fold(1L) { a, b -> a * b } * bytesOf(tensor.dtype))
        }
        state = buffers()
        spare = buffers()
        val options = Interpreter.Options().setNumThreads(threads).setUseXNNPACK(true)
        interpreter = Interpreter(artifact, options)
        val signatures = interpreter.signatureKeys.toSet()
        require("prefill" in signatures && "decode" in signatures) { "${artifact.name} has signatures $signatures" }
    }

    override fun maxContext(): Int = manifest.maxContext

    override fun maxChunk(): Int = chunk

    override fun step(tokens: IntArray, start: Int): FloatArray {
        require(tokens.size in 1..chunk && start + tokens.size <= manifest.maxContext) {
            "${tokens.size} tokens at $start do not fit (1..$chunk per call, ${manifest.maxContext} in all)"
        }
        if (start == 0) state.values.forEach { zero(it) } // a new sequence starts from zeroed state
        val inputs = HashMap<String, Any>()
        position.clear(); position.putInt(start); position.rewind()
        inputs["input_pos"] = position
        val signature = if (tokens.size == 1) {
            decodeToken.clear(); decodeToken.putInt(tokens[0]); decodeToken.rewind()
            inputs["tokens"] = decodeToken
            "decode"
        } else {
            prefillTokens.clear()
            for (k in 0 until chunk) prefillTokens.putInt(if (k < tokens.size) tokens[k] else 0)
            prefillTokens.rewind()
            length.clear(); length.putInt(tokens.size); length.rewind()
            inputs["tokens"] = prefillTokens
            inputs["length"] = length
            "prefill"
        }
        for ((name, buffer) in state) inputs[name] = buffer.rewind()
        val outputs = HashMap<String, Any>()
        logits.clear()
        outputs["logits"] = logits
        for ((output, input) in feeds) outputs[output] = spare.getValue(input).clear()
        interpreter.runSignature(inputs, outputs, signature)
        val swap = state
        state = spare
        spare = swap
        logits.rewind()
        val out = FloatArray(vocab)
        logits.asFloatBuffer().get(out)
        return out
    }

    override fun canSnapshot(): Boolean = true

    override fun snapshot(): Any = state.mapValues { (_, buffer) ->
        direct(buffer.capacity().toLong()).put(buffer.duplicate().rewind() as ByteBuffer).rewind()
    }

    @Suppress("UNCHECKED_CAST")
    override fun restore(snapshot: Any) {
        for ((name, copy) in snapshot as Map<String, ByteBuffer>) {
            val target = state.getValue(name)
            target.clear()
            target.put(copy.duplicate().rewind() as ByteBuffer)
            target.rewind()
        }
    }

    override fun close() {
        interpreter.close()
    }

    private companion object {
        fun direct(bytes: Long): ByteBuffer = ByteBuffer.allocateDirect(bytes.toInt()).order(ByteOrder.nativeOrder())

        fun zero(buffer: ByteBuffer) {
            buffer.clear()
            while (buffer.remaining() >= 8) buffer.putLong(0)
            while (buffer.hasRemaining()) buffer.put(0)
            buffer.rewind()
        }

        fun bytesOf(dtype: String): Long = when (dtype) {
            "float32", "int32" -> 4
            "float16", "bfloat16" -> 2
            "int64" -> 8
            "int8", "uint8", "bool" -> 1
            else -> throw IllegalArgumentException("state dtype $dtype")
        }
    }
}
