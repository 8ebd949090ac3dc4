plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
    id("org.jetbrains.kotlin.plugin.compose")
}

val executorchVersion = providers.gradleProperty("qwenmobile.executorchVersion").get()
val litertVersion = providers.gradleProperty("qwenmobile.litertVersion").get()

android {
    namespace = "dev.qwenmobile.app"
    compileSdk = 35

    defaultConfig {
        applicationId = "dev.qwenmobile.app"
        // 26: java.nio.file, which the core reads bundles with; both runtimes ship arm64-v8a libraries
        minSdk = 26
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") }
    }

    buildTypes {
        release {
            isMinifyEnabled = false
            signingConfig = signingConfigs.getByName("debug")
        }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
    buildFeatures { compose = true }
    packaging {
        // the two runtimes each bring libc++_shared.so
        jniLibs { pickFirsts += listOf("**/libc++_shared.so", "**/libfbjni.so") }
    }
}

dependencies {
    implementation(project(":core"))

    implementation("org.pytorch:executorch-android:$executorchVersion")
    implementation("com.google.ai.edge.litert:litert:$litertVersion")

    implementation(platform("androidx.compose:compose-bom:2024.10.01"))
    implementation("androidx.compose.ui:ui")
    implementation("androidx.compose.material3:material3")
    implementation("androidx.compose.material:material-icons-core")
    implementation("androidx.activity:activity-compose:1.9.3")
    implementation("androidx.lifecycle:lifecycle-viewmodel-compose:2.8.7")
    implementation("androidx.lifecycle:lifecycle-runtime-compose:2.8.7")
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.9.0")
}
