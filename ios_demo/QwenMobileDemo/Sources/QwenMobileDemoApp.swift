import SwiftUI

@main
struct QwenMobileDemoApp: App {
    @StateObject private var model = ChatModel()

    var body: some Scene {
        WindowGroup {
            ChatView(model: model)
        }
    }
}
