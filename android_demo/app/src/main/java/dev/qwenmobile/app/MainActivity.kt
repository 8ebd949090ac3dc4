package dev.qwenmobile.app

import android.os.Bundle
import androidx.activity.ComponentActivity
import androidx.activity.compose.setContent
import androidx.activity.viewModels
import androidx.compose.foundation.background
import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Box
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.Spacer
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.imePadding
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.layout.width
import androidx.compose.foundation.layout.widthIn
import androidx.compose.foundation.lazy.LazyColumn
import androidx.compose.foundation.lazy.itemsIndexed
import androidx.compose.foundation.lazy.rememberLazyListState
import androidx.compose.foundation.shape.RoundedCornerShape
import androidx.compose.material3.Button
import androidx.compose.material3.DropdownMenu
import androidx.compose.material3.DropdownMenuItem
import androidx.compose.material3.ExperimentalMaterial3Api
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedButton
import androidx.compose.material3.OutlinedTextField
import androidx.compose.material3.Scaffold
import androidx.compose.material3.Surface
import androidx.compose.material3.Switch
import androidx.compose.material3.Text
import androidx.compose.material3.TextButton
import androidx.compose.material3.TopAppBar
import androidx.compose.material3.darkColorScheme
import androidx.compose.material3.lightColorScheme
import androidx.compose.foundation.isSystemInDarkTheme
import androidx.compose.runtime.Composable
import androidx.compose.runtime.LaunchedEffect
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.remember
import androidx.compose.runtime.saveable.rememberSaveable
import androidx.compose.runtime.setValue
import androidx.compose.ui.Alignment
import androidx.compose.ui.Modifier
import androidx.compose.ui.graphics.Color
import androidx.compose.ui.text.font.FontStyle
import androidx.compose.ui.unit.dp
import androidx.lifecycle.compose.collectAsStateWithLifecycle

class MainActivity : ComponentActivity() {
    private val model: ChatViewModel by viewModels()

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContent {
            MaterialTheme(colorScheme = if (isSystemInDarkTheme()) darkColorScheme() else lightColorScheme()) {
                ChatScreen(model)
            }
        }
    }

    override fun onResume() {
        super.onResume()
        model.refreshBundles() // a bundle pushed while the app was in the background
    }
}

@OptIn(ExperimentalMaterial3Api::class)
@Composable
fun ChatScreen(model: ChatViewModel) {
    val state by model.state.collectAsStateWithLifecycle()
    var pickerOpen by remember { mutableStateOf(false) }
    var input by rememberSaveable { mutableStateOf("") }
    val listState = rememberLazyListState()
    LaunchedEffect(state.lines.size, state.lines.lastOrNull()?.text?.length) {
        if (state.lines.isNotEmpty()) listState.scrollToItem(state.lines.size - 1)
    }
    Scaffold(
        topBar = {
            TopAppBar(
                title = {
                    Box {
                        TextButton(onClick = { model.refreshBundles(); pickerOpen = true }) {
                            Text(state.loaded?.let { "${it.name} (${it.backend}, ${it.quant})" } ?: "Choose a model ▾")
                        }
                        DropdownMenu(expanded = pickerOpen, onDismissRequest = { pickerOpen = false }) {
                            if (state.bundles.isEmpty()) {
                                DropdownMenuItem(text = { Text("No bundle found") }, onClick = { pickerOpen = false })
                            }
                            state.bundles.forEach { bundle ->
                                DropdownMenuItem(
                                    text = { Text("${bundle.name} · ${bundle.backend} ${bundle.quant}") },
                                    onClick = { pickerOpen = false; model.load(bundle) },
                                )
                            }
                        }
                    }
                },
                actions = {
                    TextButton(onClick = { model.newChat() }, enabled = state.loaded != null && !state.generating) {
                        Text("New chat")
                    }
                },
            )
        },
    ) { padding ->
        Column(Modifier.fillMaxSize().padding(padding).imePadding()) {
            Row(
                Modifier.fillMaxWidth().padding(horizontal = 12.dp),
                verticalAlignment = Alignment.CenterVertically,
            ) {
                Text("Thinking", style = MaterialTheme.typography.bodyMedium)
                Spacer(Modifier.width(8.dp))
                Switch(
                    checked = state.thinking,
                    onCheckedChange = { model.setThinking(it) },
                    enabled = state.canThink && !state.generating,
                )
                Spacer(Modifier.weight(1f))
                Text(
                    "%.1f tok/s · %d/%d".format(state.tokensPerSecond, state.contextUsed, state.contextSize),
                    style = MaterialTheme.typography.bodySmall,
                )
            }
            if (state.status.isNotEmpty()) {
                Text(state.status, Modifier.padding(12.dp), color = MaterialTheme.colorScheme.error)
            }
            LazyColumn(
                Modifier.weight(1f).fillMaxWidth().padding(horizontal = 8.dp),
                state = listState,
                verticalArrangement = Arrangement.spacedBy(8.dp),
            ) {
                itemsIndexed(state.lines) { index, line ->
                    MessageBubble(line)
                    val last = index == state.lines.size - 1
                    if (last && line.role == "assistant" && state.canRegenerate && !state.generating) {
                        TextButton(onClick = { model.regenerate() }) { Text("Regenerate") }
                    }
                }
            }
            Row(Modifier.fillMaxWidth().padding(8.dp), verticalAlignment = Alignment.CenterVertically) {
                OutlinedTextField(
                    value = input,
                    onValueChange = { input = it },
                    modifier = Modifier.weight(1f),
                    placeholder = { Text("Message") },
                    enabled = state.loaded != null,
                    maxLines = 6,
                )
                Spacer(Modifier.width(8.dp))
                if (state.generating) {
                    OutlinedButton(onClick = { model.stop() }) { Text("Stop") }
                } else {
                    Button(
                        onClick = { model.send(input.trim()); input = "" },
                        enabled = state.loaded != null && input.isNotBlank(),
                    ) { Text("Send") }
                }
            }
        }
    }
}

@Composable
fun MessageBubble(line: ChatLine) {
    val user = line.role == "user"
    Row(Modifier.fillMaxWidth(), horizontalArrangement = if (user) Arrangement.End else Arrangement.Start) {
        Surface(
            shape = RoundedCornerShape(12.dp),
            color = if (user) MaterialTheme.colorScheme.primaryContainer else MaterialTheme.colorScheme.surfaceVariant,
            modifier = Modifier.widthIn(max = 320.dp),
        ) {
            Column(Modifier.padding(10.dp)) {
                if (line.thinking.isNotEmpty()) {
                    Text(
                        line.thinking,
                        fontStyle = FontStyle.Italic,
                        color = MaterialTheme.colorScheme.onSurfaceVariant.copy(alpha = 0.7f),
                        style = MaterialTheme.typography.bodySmall,
                        modifier = Modifier.background(Color.Transparent),
                    )
                    Spacer(Modifier.width(4.dp))
                }
                Text(if (line.text.isEmpty() && line.thinking.isEmpty() && !user) "…" else line.text)
                if (line.stats.isNotEmpty()) {
                    Text(line.stats, style = MaterialTheme.typography.labelSmall, color = MaterialTheme.colorScheme.outline)
                }
            }
        }
    }
}
