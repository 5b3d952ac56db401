# Unit tests for the `casf` reference policy (Rego v1).
#
# Run with `opa test policies/` or through the regorus-backed runner
# (`tests/rego_policy.rs`). Every test checks `allow` and, where it matters,
# the exact violation set.

package casf_test

import data.casf

# The tool lists are restated here (not read from data.casf) so that a tool
# dropped from the policy's lists makes a test fail.
write_tools := [
	"cliniccloud.create_appointment",
	"cliniccloud.cancel_appointment",
	"twilio.send_sms",
	"stripe.generate_invoice",
]

read_tools := [
	"cliniccloud.list_appointments",
	"cliniccloud.summary_history",
]

# A well-formed request for `tool` in `mode`.
req(tool, mode) := {
	"tool": tool,
	"mode": mode,
	"role": "receptionist",
	"subject": {"patient_id": "pat-001"},
	"args": {},
	"context": {"tenant_id": "tenant-a"},
}

# `inp` with top-level field `key` replaced by `value` (object.union alone
# would merge nested objects instead of replacing them).
set_field(inp, key, value) := object.union(object.remove(inp, [key]), {key: value})

# `allow` is true and there are no violations.
allowed(inp) if {
	casf.allow == true with input as inp
	casf.violations == set() with input as inp
}

# `allow` is false and the violations are exactly `want`.
denied(inp, want) if {
	casf.allow == false with input as inp
	casf.violations == want with input as inp
}

# --- every tool in mode ALLOW -------------------------------------------

test_create_appointment_allowed_in_allow_mode if {
	allowed(req("cliniccloud.create_appointment", "ALLOW"))
}

test_cancel_appointment_allowed_in_allow_mode if {
	allowed(req("cliniccloud.cancel_appointment", "ALLOW"))
}

test_send_sms_allowed_in_allow_mode if {
	allowed(req("twilio.send_sms", "ALLOW"))
}

test_generate_invoice_allowed_in_allow_mode if {
	allowed(req("stripe.generate_invoice", "ALLOW"))
}

test_list_appointments_allowed_in_allow_mode if {
	allowed(req("cliniccloud.list_appointments", "ALLOW"))
}

test_summary_history_allowed_in_allow_mode if {
	allowed(req("cliniccloud.summary_history", "ALLOW"))
}

# --- reads in the restricted modes ---------------------------------------

test_list_appointments_allowed_in_step_up if {
	allowed(req("cliniccloud.list_appointments", "STEP_UP"))
}

test_summary_history_allowed_in_step_up if {
	allowed(req("cliniccloud.summary_history", "STEP_UP"))
}

test_list_appointments_allowed_in_read_only if {
	allowed(req("cliniccloud.list_appointments", "READ_ONLY"))
}

test_summary_history_allowed_in_read_only if {
	allowed(req("cliniccloud.summary_history", "READ_ONLY"))
}

# --- writes outside mode ALLOW -------------------------------------------

test_writes_denied_in_step_up_without_violations if {
	every tool in write_tools {
		denied(req(tool, "STEP_UP"), set())
	}
}

test_writes_denied_in_read_only if {
	every tool in write_tools {
		denied(req(tool, "READ_ONLY"), {"Mode_ReadOnly_NoWrite"})
	}
}

test_writes_denied_in_kill_switch if {
	every tool in write_tools {
		denied(req(tool, "KILL_SWITCH"), {"Mode_KillSwitch"})
	}
}

test_reads_denied_in_kill_switch if {
	every tool in read_tools {
		denied(req(tool, "KILL_SWITCH"), {"Mode_KillSwitch"})
	}
}

test_unknown_mode_denied_without_violations if {
	denied(req("cliniccloud.list_appointments", "MAINTENANCE"), set())
}

# --- tenant ----------------------------------------------------------------

test_missing_tenant_id_denied if {
	inp := set_field(req("cliniccloud.list_appointments", "ALLOW"), "context", {})
	denied(inp, {"BadRequest_MissingTenantId"})
}

test_missing_context_denied if {
	inp := object.remove(req("cliniccloud.create_appointment", "ALLOW"), ["context"])
	denied(inp, {"BadRequest_MissingTenantId"})
}

test_empty_tenant_id_denied if {
	inp := set_field(req("cliniccloud.create_appointment", "ALLOW"), "context", {"tenant_id": ""})
	denied(inp, {"BadRequest_MissingTenantId"})
}

test_non_string_tenant_id_denied if {
	inp := set_field(req("cliniccloud.list_appointments", "ALLOW"), "context", {"tenant_id": 42})
	denied(inp, {"BadRequest_MissingTenantId"})
}

# --- patient ---------------------------------------------------------------

test_summary_history_missing_patient_id_denied if {
	inp := set_field(req("cliniccloud.summary_history", "ALLOW"), "subject", {})
	denied(inp, {"BadRequest_MissingPatientId"})
}

test_summary_history_empty_patient_id_denied if {
	inp := set_field(req("cliniccloud.summary_history", "READ_ONLY"), "subject", {"patient_id": ""})
	denied(inp, {"BadRequest_MissingPatientId"})
}

test_send_sms_missing_patient_id_denied if {
	inp := object.remove(req("twilio.send_sms", "ALLOW"), ["subject"])
	denied(inp, {"BadRequest_MissingPatientId"})
}

test_patient_id_not_needed_by_other_tools if {
	every tool in ["cliniccloud.create_appointment", "cliniccloud.cancel_appointment", "stripe.generate_invoice", "cliniccloud.list_appointments"] {
		allowed(object.remove(req(tool, "ALLOW"), ["subject"]))
	}
}

# --- role --------------------------------------------------------------------

test_every_known_role_allowed if {
	every role in ["receptionist", "nurse", "doctor", "billing", "custodian", "system"] {
		allowed(set_field(req("cliniccloud.create_appointment", "ALLOW"), "role", role))
	}
}

test_unknown_role_denied if {
	inp := set_field(req("cliniccloud.list_appointments", "ALLOW"), "role", "janitor")
	denied(inp, {"BadRequest_UnknownRole"})
}

test_missing_role_denied if {
	inp := object.remove(req("cliniccloud.create_appointment", "ALLOW"), ["role"])
	denied(inp, {"BadRequest_UnknownRole"})
}

# --- tool --------------------------------------------------------------------

test_unknown_tool_not_allowed if {
	denied(req("cliniccloud.delete_everything", "ALLOW"), set())
}

test_missing_tool_not_allowed if {
	denied(object.remove(req("twilio.send_sms", "ALLOW"), ["tool"]), set())
}

# --- violations accumulate -----------------------------------------------------

test_violations_accumulate if {
	inp := {
		"tool": "twilio.send_sms",
		"mode": "KILL_SWITCH",
		"role": "intruder",
		"subject": {},
		"args": {},
		"context": {"tenant_id": ""},
	}
	denied(inp, {
		"Mode_KillSwitch",
		"BadRequest_MissingTenantId",
		"BadRequest_MissingPatientId",
		"BadRequest_UnknownRole",
	})
}

test_read_only_write_with_bad_request_reports_both if {
	inp := set_field(req("stripe.generate_invoice", "READ_ONLY"), "context", {"tenant_id": ""})
	denied(inp, {"Mode_ReadOnly_NoWrite", "BadRequest_MissingTenantId"})
}
