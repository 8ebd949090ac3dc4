import SwiftUI

struct ChatView: View {
    @ObservedObject var model: ChatModel
    @State private var input = ""

    var body: some View {
        NavigationStack {
            VStack(spacing: 0) {
                HStack {
                    Toggle("Thinking", isOn: Binding(get: { model.thinking }, set: { model.setThinking($0) }))
                        .disabled(!model.canThink || model.generating)
                        .fixedSize()
                    Spacer()
                    Text(String(format: "%.1f tok/s · %d/%d", model.tokensPerSecond, model.contextUsed, model.contextSize))
                        .font(.caption).monospacedDigit()
                }
                .padding(.horizontal)
                if !model.status.isEmpty {
                    Text(model.status).font(.footnote).foregroundStyle(.red).padding(.horizontal)
                }
                ScrollViewReader { proxy in
                    ScrollView {
                        LazyVStack(alignment: .leading, spacing: 8) {
                            ForEach(model.lines) { line in
                                Bubble(line: line).id(line.id)
                            }
                            if model.canRegenerate && !model.generating && model.lines.last?.role == "assistant" {
                                Button("Regenerate") { model.regenerate() }.font(.footnote)
                            }
                        }
                        .padding(8)
                    }
                    .onChange(of: model.lines.last?.text) {
                        if let last = model.lines.last { proxy.scrollTo(last.id, anchor: .bottom) }
                    }
                }
                HStack {
                    TextField("Message", text: $input, axis: .vertical)
                        .lineLimit(1...6)
                        .textFieldStyle(.roundedBorder)
                        .disabled(model.loaded == nil)
                    if model.generating {
                        Button("Stop") { model.stop() }.buttonStyle(.bordered)
                    } else {
                        Button("Send") {
                            model.send(input)
                            input = ""
                        }
                        .buttonStyle(.borderedProminent)
                        .disabled(model.loaded == nil || input.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty)
                    }
                }
                .padding(8)
            }
            .toolbar {
                ToolbarItem(placement: .principal) {
                    Menu {
                        if model.bundles.isEmpty { Text("No bundle found") }
                        ForEach(model.bundles) { bundle in
                            Button("\(bundle.name) · \(bundle.backend) \(bundle.quant)") { model.load(bundle) }
                        }
                    } label: {
                        Text(model.loaded.map { "\($0.name) (\($0.backend), \($0.quant))" } ?? "Choose a model ▾")
                    }
                    .onTapGesture { model.refresh() }
                }
                ToolbarItem(placement: .topBarTrailing) {
                    Button("New chat") { model.newChat() }.disabled(model.loaded == nil || model.generating)
                }
            }
            .navigationBarTitleDisplayMode(.inline)
            .onAppear { model.refresh() }
        }
    }
}

struct Bubble: View {
    let line: ChatLine

    var body: some View {
        let user = line.role == "user"
        HStack {
            if user { Spacer(minLength: 40) }
            VStack(alignment: .leading, spacing: 4) {
                if !line.thinking.isEmpty {
                    Text(line.thinking).font(.footnote).italic().foregroundStyle(.secondary)
                }
                Text(line.text.isEmpty && line.thinking.isEmpty && !user ? "…" : line.text)
                if !line.stats.isEmpty {
                    Text(line.stats).font(.caption2).foregroundStyle(.secondary)
                }
            }
            .padding(10)
            .background(user ? Color.accentColor.opacity(0.15) : Color.secondary.opacity(0.12))
            .clipShape(RoundedRectangle(cornerRadius: 12))
            if !user { Spacer(minLength: 40) }
        }
    }
}
