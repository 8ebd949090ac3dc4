import Foundation

/// Typed access to JSONSerialization's output, with errors that name the field.
public struct JSONError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

enum J {
    static func parse(_ data: Data) throws -> Any {
        try JSONSerialization.jsonObject(with: data, options: [.fragmentsAllowed])
    }

    static func obj(_ value: Any?, _ what: String) throws -> [String: Any] {
        guard let object = value as? [String: Any] else { throw JSONError("\(what): expected an object") }
        return object
    }

    static func arr(_ value: Any?, _ what: String) throws -> [Any] {
        guard let array = value as? [Any] else { throw JSONError("\(what): expected an array") }
        return array
    }

    static func str(_ value: Any?, _ what: String) throws -> String {
        guard let string = value as? String else { throw JSONError("\(what): expected a string") }
        return string
    }

    static func optStr(_ value: Any?) -> String? { value as? String }

    static func bool(_ value: Any?, _ what: String) throws -> Bool {
        guard let number = value as? NSNumber, CFGetTypeID(number) == CFBooleanGetTypeID() else {
            throw JSONError("\(what): expected true or false")
        }
        return number.boolValue
    }

    static func isNull(_ value: Any?) -> Bool { value == nil || value is NSNull }

    static func num(_ value: Any?, _ what: String) throws -> NSNumber {
        guard let number = value as? NSNumber, CFGetTypeID(number) != CFBooleanGetTypeID() else {
            throw JSONError("\(what): expected a number")
        }
        return number
    }

    static func int(_ value: Any?, _ what: String) throws -> Int { try num(value, what).intValue }

    static func double(_ value: Any?, _ what: String, _ fallback: Double) throws -> Double {
        isNull(value) ? fallback : try num(value, what).doubleValue
    }

    static func ints(_ value: Any?, _ what: String) throws -> [Int] {
        try arr(value, what).map { try int($0, what) }
    }
}
