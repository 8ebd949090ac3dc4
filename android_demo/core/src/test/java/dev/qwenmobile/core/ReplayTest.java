package dev.qwenmobile.core;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.ValueSource;

/**
 * The generation loop and multi-turn driver against the Python runner on an ExecuTorch bundle of
 * the embedded model: same tokens fed at the same positions, same replies, multi-turn,
 * regenerate, context rebuild, loop guard and stop tokens included.
 */
class ReplayTest {
    @ParameterizedTest
    @ValueSource(strings = {"greedy", "sampled", "context", "loop", "stops", "thinking"})
    void replaysThePythonRunner(String name) throws Exception {
        Map<String, Object> golden = TestData.obj(TestData.json("replay_" + name + ".json"));
        Map<String, Object> engineJson = TestData.obj(golden.get("engine"));
        ReplayEngine engine = new ReplayEngine(TestData.arr(golden.get("calls")),
                Json.num(engineJson.get("vocab_size"), "vocab").intValue(),
                Json.num(engineJson.get("max_context"), "max_context").intValue(),
                Json.num(engineJson.get("max_chunk"), "max_chunk").intValue());
        Tokenizer tokenizer = Tokenizer.fromFile(TestData.file("tokenizer.json"));
        Object maxContext = golden.get("max_context");
        Conversation chat = new Conversation(engine, new ChatFormat(TestData.obj(golden.get("chat_format"))), tokenizer,
                Json.ints(golden.get("stop_ids"), "stop_ids"), TestData.sampling(golden.get("sampling")),
                Long.parseLong((String) golden.get("seed")), (String) golden.get("system"), null, 1,
                LoopGuard.fromJson(TestData.obj(golden.get("loop_guard"))),
                maxContext == null ? 0 : ((Json.Num) maxContext).intValue());
        int turnIndex = 0;
        for (Object t : TestData.arr(golden.get("turns"))) {
            Map<String, Object> turn = TestData.obj(t);
            chat.setMaxNewTokens(Json.num(turn.get("max_new_tokens"), "max_new_tokens").intValue());
            if (turn.containsKey("enable_thinking")) chat.setEnableThinking(TestData.optionalBool(turn.get("enable_thinking")));
            List<Integer> streamed = new ArrayList<>();
            Conversation.Reply reply = Boolean.TRUE.equals(turn.get("regenerate"))
                    ? chat.regenerate(streamed::add, null)
                    : chat.say((String) turn.get("user"), streamed::add, null);
            Map<String, Object> expect = TestData.obj(turn.get("expect"));
            String where = name + " turn " + turnIndex++;
            assertArrayEquals(Json.ints(expect.get("tokens"), "tokens"), reply.tokens, where + ": tokens");
            assertEquals(expect.get("text"), reply.text, where + ": text");
            assertEquals(((String) expect.get("finish")).toUpperCase(), reply.finish.name(), where + ": finish");
            assertEquals(Json.num(expect.get("prompt_tokens"), "p").intValue(), reply.promptTokens, where + ": prompt tokens");
            assertEquals(expect.get("rebuilt"), reply.rebuilt, where + ": rebuilt");
            assertEquals(reply.tokens.length, streamed.size(), where + ": every token streamed");
        }
        assertTrue(engine.finished(), name + ": " + engine.next + " of the recorded calls were made");
        List<Integer> fed = new ArrayList<>();
        for (int id : Json.ints(golden.get("fed"), "fed")) fed.add(id);
        assertEquals(fed, chat.fed(), name + ": the context the engine holds");
        List<Object> messages = TestData.arr(golden.get("messages"));
        assertEquals(messages.size(), chat.messages().size());
        for (int k = 0; k < messages.size(); k++) {
            assertEquals(TestData.obj(messages.get(k)).get("content"), chat.messages().get(k).content);
        }
    }
}
