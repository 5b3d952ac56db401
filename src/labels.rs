//! Closed sets of metric label values, as enums.
//!
//! A label such as `kind` on `casf_opa_error_total` may only take the values
//! the code can produce, and every one of them is pre-created at zero so
//! that a dashboard sees the series before the first failure. Declared as
//! an enum with an `ALL` list, the set is written once: the error's
//! `kind()`, the metric's pre-created series and the rate-limited log all
//! read it from the same type, and a new variant cannot be forgotten in one
//! of them.

/// Declares a label enum: `Variant => "label"`, with `ALL` and `as_str`.
macro_rules! label_enum {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident => $label:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        $vis enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The label value, as exported.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $label),+ }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use label_enum;

#[cfg(test)]
mod tests {
    label_enum!(
        enum Outcome {
            Ok => "ok",
            Refused => "refused",
        }
    );

    #[test]
    fn every_value_is_listed_once_with_its_label() {
        let labels: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
        assert_eq!(labels, ["ok", "refused"]);
        assert_eq!(Outcome::Refused.to_string(), "refused");
    }
}
