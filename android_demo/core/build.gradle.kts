// The engine-independent core: plain Java 17, no Android dependency. On this machine it is built and
// tested by run_tests.sh (javac + the JUnit console launcher); Gradle runs the same tests with `test`.
plugins {
    `java-library`
}

java {
    toolchain { languageVersion.set(JavaLanguageVersion.of(17)) }
}

tasks.withType<JavaCompile>().configureEach {
    options.release.set(17)
    options.encoding = "UTF-8"
}

dependencies {
    testImplementation("org.junit.jupiter:junit-jupiter:5.9.2")
    testRuntimeOnly("org.junit.platform:junit-platform-launcher")
}

tasks.test {
    useJUnitPlatform()
    systemProperty("qwenmobile.testdata", file("testdata").absolutePath)
}
