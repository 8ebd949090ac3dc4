// swift-tools-version:5.9
// The engine-independent core of the iOS demo, mirroring android_demo/core (Java) step for step,
// tested on the same golden files (android_demo/core/testdata/goldens). Tokenization is
// swift-transformers' Tokenizers, held to the Python tokenizers library by those goldens.
import PackageDescription

let package = Package(
    name: "QwenMobileKit",
    platforms: [.iOS(.v18), .macOS(.v15)],
    products: [
        .library(name: "QwenMobileKit", targets: ["QwenMobileKit"]),
    ],
    dependencies: [
        .package(url: "https://github.com/huggingface/swift-transformers", from: "1.0.0"),
    ],
    targets: [
        .target(
            name: "QwenMobileKit",
            dependencies: [.product(name: "Tokenizers", package: "swift-transformers")]
        ),
        .testTarget(name: "QwenMobileKitTests", dependencies: ["QwenMobileKit"]),
    ]
)
