package dev.qwenmobile.core;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;

/** ChatFormat.render against the Jinja templates' own renderings (chat_cases.json). */
class ChatFormatGoldenTest {
    static List<ChatFormat.Message> messages(Object json) {
        List<ChatFormat.Message> out = new ArrayList<>();
        for (Object m : TestData.arr(json)) {
            Map<String, Object> message = TestData.obj(m);
            out.add(new ChatFormat.Message((String) message.get("role"), (String) message.get("content")));
        }
        return out;
    }

    @Test
    void rendersAsTheTemplatesDo() throws Exception {
        Map<String, Object> golden = TestData.obj(TestData.json("chat_cases.json"));
        assertEquals(List.of("embedded", "qwen35_style", "qwen35_style_thinking_off", "qwen25_style_default_system"),
                List.copyOf(golden.keySet()));
        int checked = 0;
        for (Map.Entry<String, Object> template : golden.entrySet()) {
            Map<String, Object> entry = TestData.obj(template.getValue());
            ChatFormat format = new ChatFormat(TestData.obj(entry.get("chat_format")));
            for (Object c : TestData.arr(entry.get("cases"))) {
                Map<String, Object> m = TestData.obj(c);
                String rendered = format.render(messages(m.get("messages")), (Boolean) m.get("add_generation_prompt"),
                        TestData.optionalBool(m.get("enable_thinking")));
                assertEquals(m.get("rendered"), rendered, template.getKey() + ": " + m.get("messages"));
                checked++;
            }
        }
        assertTrue(checked > 200, checked + " renderings");
    }

    @Test
    void splitsThinkingAndRefusesOtherShapes() throws Exception {
        Map<String, Object> golden = TestData.obj(TestData.json("chat_cases.json"));
        ChatFormat format = new ChatFormat(TestData.obj(TestData.obj(golden.get("qwen35_style")).get("chat_format")));
        assertArrayEquals(new String[] {"plan", "42"}, format.splitThinking(true, "plan\n</think>\n\n42"));
        assertArrayEquals(new String[] {"still going", ""}, format.splitThinking(null, "still going"));
        assertArrayEquals(new String[] {"", "42"}, format.splitThinking(false, "42"));
        assertThrows(IllegalArgumentException.class, () -> format.render(
                List.of(ChatFormat.Message.user("a"), ChatFormat.Message.assistant("b")), true, null));
        assertThrows(IllegalArgumentException.class, () -> format.render(List.of(), true, null));
    }
}
