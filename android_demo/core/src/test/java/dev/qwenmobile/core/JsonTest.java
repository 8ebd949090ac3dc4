package dev.qwenmobile.core;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.List;
import java.util.Map;
import org.junit.jupiter.api.Test;

class JsonTest {
    @Test
    void parsesEveryKindOfValue() {
        Map<String, Object> m = Json.obj(Json.parse(
                " {\"a\": [1, -2.5e3, true, false, null], \"s\": \"x\\n\\u00e9\\ud83d\\ude00\\\"\", \"o\": {}, \"e\": []} "), "t");
        List<Object> a = Json.arr(m.get("a"), "a");
        assertEquals(1, ((Json.Num) a.get(0)).intValue());
        assertEquals(-2500.0, ((Json.Num) a.get(1)).doubleValue());
        assertEquals(Boolean.TRUE, a.get(2));
        assertEquals(Boolean.FALSE, a.get(3));
        assertNull(a.get(4));
        assertEquals("x\né😀\"", m.get("s"));
        assertTrue(Json.obj(m.get("o"), "o").isEmpty());
        assertEquals(List.of("a", "s", "o", "e"), List.copyOf(m.keySet()));
    }

    @Test
    void keepsNumbersExactly() {
        Json.Num big = Json.num(Json.parse("9007199254740993"), "n");
        assertEquals(9007199254740993L, big.longValue()); // not representable as a double
        Json.Num f = Json.num(Json.parse("0.1"), "n");
        assertEquals(0.1f, f.floatValue());
        assertEquals("0.1", f.text);
    }

    @Test
    void rejectsMalformedJson() {
        for (String bad : new String[] {"", "{", "[1,]", "{\"a\" 1}", "01", "1.", "\"\\x\"", "\"a\nb\"", "[1] 2", "tru", "{a:1}"}) {
            assertThrows(Json.JsonException.class, () -> Json.parse(bad), bad);
        }
    }
}
