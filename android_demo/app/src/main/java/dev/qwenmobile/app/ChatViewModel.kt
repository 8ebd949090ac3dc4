package dev.qwenmobile.app

import android.app.Application
import android.content.Context
import androidx.lifecycle.AndroidViewModel
import androidx.lifecycle.viewModelScope
import dev.qwenmobile.app.engines.ExecuTorchEngine
import dev.qwenmobile.app.engines.LiteRtEngine
import dev.qwenmobile.core.Conversation
import dev.qwenmobile.core.Engine
import dev.qwenmobile.core.Manifest
import dev.qwenmobile.core.Tokenizer
import java.io.File
import java.util.concurrent.Executors
import java.util.concurrent.atomic.AtomicBoolean
import kotlinx.coroutines.asCoroutineDispatcher
import kotlinx.coroutines.flow.MutableStateFlow
import kotlinx.coroutines.flow.StateFlow
import kotlinx.coroutines.flow.update
import kotlinx.coroutines.launch
import kotlinx.coroutines.withContext

/** A bundle directory found in the app's storage. */
data class BundleInfo(val dir: File, val name: String, val backend: String, val quant: String)

data class ChatLine(
    val role: String,
    val text: String,
    val thinking: String = "",
    val stats: String = "",
)

data class UiState(
    val bundles: List<BundleInfo> = emptyList(),
    val loaded: BundleInfo? = null,
    val status: String = "",
    val lines: List<ChatLine> = emptyList(),
    val generating: Boolean = false,
    val canThink: Boolean = false,
    val thinking: Boolean = false,
    val tokensPerSecond: Double = 0.0,
    val contextUsed: Int = 0,
    val contextSize: Int = 0,
    val canRegenerate: Boolean = false,
)

/**
 * Finds bundles, verifies and loads one (engine chosen by the manifest's backend), and runs the
 * chat on one engine thread; tokens stream into [state] as they are sampled.
 */
class ChatViewModel(app: Application) : AndroidViewModel(app) {
    private val _state = MutableStateFlow(UiState())
    val state: StateFlow<UiState> = _state

    private val engineThread = Executors.newSingleThreadExecutor { r -> Thread(r, "engine") }.asCoroutineDispatcher()
    private val cancel = AtomicBoolean(false)
    private var engine: Engine? = null
    private var manifest: Manifest? = null
    private var tokenizer: Tokenizer? = null
    private var conversation: Conversation? = null
    private var seed = System.nanoTime()

    init {
        refreshBundles()
    }

    /** Bundles under files/bundles (adb push with run-as) and Android/data/<app>/files/bundles (plain adb push). */
    fun bundleRoots(): List<File> {
        val context = getApplication<Application>()
        return listOfNotNull(File(context.filesDir, "bundles"), context.getExternalFilesDir(null)?.let { File(it, "bundles") })
    }

    fun refreshBundles() {
        viewModelScope.launch {
            val found = withContext(engineThread) {
                bundleRoots().flatMap { root -> root.listFiles()?.toList() ?: emptyList() }
                    .filter { File(it, Manifest.FILE).isFile }
                    .sortedBy { it.name }
                    .map { dir ->
                        try {
                            val m = Manifest.read(dir.toPath())
                            BundleInfo(dir, dir.name, m.backend, m.quantScheme)
                        } catch (e: Exception) {
                            BundleInfo(dir, dir.name, "unreadable: ${e.message}", "")
                        }
                    }
            }
            val hint = if (found.isEmpty()) "No bundle found. Push one to ${bundleRoots().last()}/NAME (see README)." else ""
            _state.update { it.copy(bundles = found, status = if (it.loaded == null) hint else it.status) }
        }
    }

    fun load(bundle: BundleInfo) {
        if (_state.value.generating) return
        viewModelScope.launch {
            _state.update { it.copy(status = "Checking ${bundle.name}…", loaded = null, lines = emptyList()) }
            try {
                withContext(engineThread) {
                    engine?.close()
                    engine = null
                    val m = Manifest.read(bundle.dir.toPath())
                    verify(bundle, m)
                    _state.update { it.copy(status = "Loading ${bundle.name}…") }
                    val artifact = File(bundle.dir, m.artifact)
                    engine = when (m.backend) {
                        "executorch" -> ExecuTorchEngine(artifact, m)
                        "tflite" -> LiteRtEngine(artifact, m, Runtime.getRuntime().availableProcessors().coerceIn(1, 4))
                        else -> throw Manifest.BundleException("${m.backend} bundles run on iOS; this app runs executorch and tflite")
                    }
                    manifest = m
                    tokenizer = m.tokenizer(bundle.dir.toPath())
                }
                val m = manifest!!
                val canThink = m.chatFormat?.thinking != null
                _state.update {
                    it.copy(
                        loaded = bundle,
                        canThink = canThink,
                        thinking = canThink && m.chatFormat!!.thinkingOn(null),
                        status = if (m.chatFormat == null) "This bundle's chat template has no chat_format; re-export it." else "",
                    )
                }
                newChat()
            } catch (e: Exception) {
                _state.update { it.copy(status = "${bundle.name}: ${e.message}") }
            }
        }
    }

    /** SHA-256 of every file, skipped when the same files (paths, sizes, times) were verified before. */
    private fun verify(bundle: BundleInfo, m: Manifest) {
        val prefs = getApplication<Application>().getSharedPreferences("verified", Context.MODE_PRIVATE)
        val key = bundle.dir.canonicalPath
        val fingerprint = m.files.keys.joinToString("|") { name ->
            val f = File(bundle.dir, name)
            "$name:${f.length()}:${f.lastModified()}"
        } + "|" + File(bundle.dir, Manifest.FILE).lastModified()
        if (prefs.getString(key, null) == fingerprint) return
        m.verifyFiles(bundle.dir.toPath()) { done, total ->
            _state.update { it.copy(status = "Verifying ${bundle.name}: ${done * 100 / maxOf(total, 1)}%") }
        }
        prefs.edit().putString(key, fingerprint).apply()
    }

    fun newChat() {
        val m = manifest ?: return
        val e = engine ?: return
        val t = tokenizer ?: return
        val format = m.chatFormat ?: return
        if (_state.value.generating) return
        val thinking: Boolean? = if (_state.value.canThink) _state.value.thinking else null
        seed += 1
        conversation = Conversation(
            e, format, t, m.eos, m.generation.sampling(thinking, format), seed, null, thinking,
            m.generation.maxNewTokens, m.generation.loopGuard, 0,
        )
        _state.update {
            it.copy(lines = emptyList(), canRegenerate = false, contextUsed = 0, contextSize = conversation!!.contextSize())
        }
    }

    fun setThinking(on: Boolean) {
        val m = manifest ?: return
        _state.update { it.copy(thinking = on) }
        conversation?.let { chat ->
            chat.setEnableThinking(on)
            chat.setSampling(m.generation.sampling(on, m.chatFormat))
        }
    }

    fun send(text: String) {
        val chat = conversation ?: return
        if (text.isBlank() || _state.value.generating) return
        _state.update { it.copy(lines = it.lines + ChatLine("user", text)) }
        generate { listener -> chat.say(text, listener) { cancel.get() } }
    }

    fun regenerate() {
        val chat = conversation ?: return
        if (_state.value.generating || !chat.canRegenerate()) return
        _state.update { it.copy(lines = it.lines.dropLast(1)) }
        generate { listener -> chat.regenerate(listener) { cancel.get() } }
    }

    fun stop() {
        cancel.set(true)
    }

    private fun generate(turn: (Conversation.TokenListener) -> Conversation.Reply) {
        val m = manifest!!
        val t = tokenizer!!
        val thinkingOn = _state.value.canThink && _state.value.thinking
        cancel.set(false)
        _state.update { it.copy(generating = true, lines = it.lines + ChatLine("assistant", "")) }
        viewModelScope.launch {
            try {
                val reply = withContext(engineThread) {
                    val stream = t.TextStream(true)
                    val text = StringBuilder()
                    val started = System.nanoTime()
                    var count = 0
                    turn(Conversation.TokenListener { token ->
                        text.append(stream.push(token))
                        count++
                        val seconds = (System.nanoTime() - started) / 1e9
                        show(m, thinkingOn, text.toString(), "", if (seconds > 0) count / seconds else 0.0)
                    })
                }
                val finish = when (reply.finish) {
                    Conversation.Finish.STOP -> ""
                    Conversation.Finish.LENGTH -> " · stopped at the reply limit"
                    Conversation.Finish.CONTEXT -> " · the context is full"
                    Conversation.Finish.LOOP -> " · stopped: the reply was repeating itself"
                    Conversation.Finish.CANCELLED -> " · stopped"
                    null -> ""
                }
                val stats = "%d tokens · prefill %d tok %.1f tok/s · decode %.1f tok/s%s%s".format(
                    reply.tokens.size, reply.promptTokens, reply.prefillTokensPerSecond(), reply.decodeTokensPerSecond(),
                    if (reply.rebuilt) " · older turns dropped" else "", finish,
                )
                show(m, thinkingOn, t.decode(reply.tokens, true), stats, reply.decodeTokensPerSecond())
            } catch (e: Exception) {
                _state.update { it.copy(status = "Generation failed: ${e.message}") }
            } finally {
                val chat = conversation
                _state.update {
                    it.copy(
                        generating = false,
                        canRegenerate = chat?.canRegenerate() == true,
                        contextUsed = chat?.contextUsed() ?: 0,
                    )
                }
            }
        }
    }

    /** Replaces the last (assistant) line with the reply so far, its thinking split off. */
    private fun show(m: Manifest, thinkingOn: Boolean, text: String, stats: String, tokensPerSecond: Double) {
        val (thinking, answer) = m.chatFormat!!.splitThinking(thinkingOn, text).let { it[0] to it[1] }
        _state.update {
            it.copy(
                lines = it.lines.dropLast(1) + ChatLine("assistant", answer, thinking, stats),
                tokensPerSecond = tokensPerSecond,
            )
        }
    }

    override fun onCleared() {
        cancel.set(true)
        viewModelScope.launch(engineThread) { engine?.close() }
        super.onCleared()
    }
}
