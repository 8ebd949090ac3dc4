package dev.qwenmobile.core;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/** The driver's paths the recorded replays do not reach: <|im_end|> stops, state copies, cancel. */
class ConversationTest {
    static final int IM_END = 2;
    static Tokenizer tokenizer;
    static ChatFormat embedded;

    @BeforeAll
    static void load() throws Exception {
        tokenizer = Tokenizer.fromFile(TestData.file("tokenizer.json"));
        Map<String, Object> chat = TestData.obj(TestData.json("chat_cases.json"));
        embedded = new ChatFormat(TestData.obj(TestData.obj(chat.get("embedded")).get("chat_format")));
    }

    static Conversation chat(Engine engine, Sampling sampling, String system, int maxNewTokens, int maxContext) {
        return new Conversation(engine, embedded, tokenizer, new int[] {IM_END, 0}, sampling, 5, system, null,
                maxNewTokens, LoopGuard.defaults(), maxContext);
    }

    @Test
    void eachTurnPrefillsOnlyItsOwnTokensAndOpensWithTheStopToken() throws Exception {
        ScriptedEngine engine = new ScriptedEngine(512, 16, 6, 4, IM_END, false);
        Conversation chat = chat(engine, Sampling.greedy(), "Be brief.", 50, 0);
        Conversation.Reply first = chat.say("Hi there", null, null);
        assertEquals(Conversation.Finish.STOP, first.finish);
        assertEquals(6, first.tokens.length);
        int callsBefore = engine.calls.size();
        Conversation.Reply second = chat.say("Tell me more\nplease", null, null);
        int[] opening = engine.call(callsBefore);
        assertEquals(IM_END, opening[0], "the sampled stop token opens the next turn");
        assertEquals(first.promptTokens + first.tokens.length, engine.calls.get(callsBefore)[0]);
        assertTrue(tokenizer.decode(opening, false).startsWith("<|im_end|>\n<|im_start|>user\nTell me more"));
        int total = 0;
        for (int[] call : engine.calls) total += call.length - 1;
        assertEquals(chat.contextUsed(), total, "no token fed twice");
        // the embedded template does not rewrite history: the context is its rendering
        List<ChatFormat.Message> history = chat.messages().subList(0, chat.messages().size() - 1);
        int[] fed = chat.fed().stream().mapToInt(Integer::intValue).toArray();
        assertEquals(embedded.render(history, true, null) + second.text, tokenizer.decode(fed, false));
    }

    @Test
    void regenerateFromAStateCopyEqualsReprefilling() throws Exception {
        int[][] replies = new int[2][];
        int[] prefillCalls = new int[2];
        for (int k = 0; k < 2; k++) {
            ScriptedEngine engine = new ScriptedEngine(512, 16, 6, 4, IM_END, k == 0);
            Conversation chat = chat(engine, Sampling.greedy(), null, 50, 0);
            chat.say("hello", null, null);
            Conversation.Reply reply = chat.say("again", null, null);
            int calls = engine.calls.size();
            Conversation.Reply again = chat.regenerate(null, null);
            assertArrayEquals(reply.tokens, again.tokens, "greedy: the same reply from the same state");
            for (int c = calls; c < engine.calls.size(); c++) if (engine.calls.get(c).length > 2) prefillCalls[k]++;
            replies[k] = again.tokens;
            assertEquals(4, chat.messages().size());
        }
        assertArrayEquals(replies[0], replies[1]);
        assertEquals(0, prefillCalls[0], "with a state copy nothing is prefilled again");
        assertTrue(prefillCalls[1] > 0, "without one the context is prefilled again from position 0");
    }

    @Test
    void sampledRegenerateDrawsANewReply() throws Exception {
        ScriptedEngine engine = new ScriptedEngine(512, 16, 8, 4, IM_END, true);
        Conversation chat = chat(engine, new Sampling(1.0, 1.0, 50, 0, 0, 0, 1), null, 50, 0);
        Conversation.Reply reply = chat.say("hello", null, null);
        assertNotEquals(List.of(reply.tokens), List.of(chat.regenerate(null, null).tokens));
    }

    @Test
    void cancelledReplyFeedsItsLastTokenWithTheNextTurn() throws Exception {
        ScriptedEngine engine = new ScriptedEngine(512, 16, 30, 4, IM_END, false);
        Conversation chat = chat(engine, Sampling.greedy(), null, 50, 0);
        int[] seen = new int[1];
        Conversation.Reply reply = chat.say("count", token -> seen[0]++, () -> seen[0] >= 3);
        assertEquals(Conversation.Finish.CANCELLED, reply.finish);
        assertEquals(3, reply.tokens.length);
        assertEquals(reply.promptTokens + 2, chat.contextUsed(), "the last token is not fed yet");
        int calls = engine.calls.size();
        chat.say("next", null, null);
        int[] opening = engine.call(calls);
        assertEquals(reply.tokens[2], opening[0]);
        assertTrue(tokenizer.decode(java.util.Arrays.copyOfRange(opening, 1, opening.length), false).startsWith("<|im_end|>\n"));
    }

    @Test
    void aTurnThatDoesNotFitRebuildsTheRecentWindow() throws Exception {
        ScriptedEngine engine = new ScriptedEngine(96, 16, 6, 4, IM_END, false);
        Conversation chat = chat(engine, Sampling.greedy(), "sys", 8, 0);
        boolean rebuilt = false;
        Conversation.Reply last = null;
        for (int k = 0; k < 6; k++) {
            last = chat.say("message number " + k + " with some words", null, null);
            rebuilt |= last.rebuilt;
        }
        assertTrue(rebuilt);
        for (int[] call : engine.calls) assertTrue(call[0] + call.length - 1 <= 96);
        int[] fed = chat.fed().stream().mapToInt(Integer::intValue).toArray();
        assertTrue(tokenizer.decode(fed, false).startsWith("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nmessage number"));
        assertTrue(tokenizer.decode(fed, false).endsWith(last.text));
    }

    @Test
    void aReplyStopsAtTheEndOfTheContext() throws Exception {
        ScriptedEngine engine = new ScriptedEngine(40, 16, 100, 4, IM_END, false);
        Conversation chat = chat(engine, Sampling.greedy(), null, 100, 0);
        Conversation.Reply reply = chat.say("hi", null, null);
        assertEquals(Conversation.Finish.CONTEXT, reply.finish);
        assertEquals(40, chat.contextUsed());
        assertThrows(IllegalArgumentException.class, () -> chat(engine, Sampling.greedy(), null, 4, 0).say("x ".repeat(60), null, null));
    }
}
