# CASF reference policy (Rego v1), queried as `data.casf`.
#
# Input: {tool, mode, role, subject, args, context}.
# Output: `allow` (bool, default false) and `violations` (set of codes).
# Hard invariants (READ_ONLY/KILL_SWITCH write denial, SMS burst, replay)
# are enforced in code as well; this policy restates the mode rules so a
# deny always carries a reason.
#
# Only core builtins are used so the file evaluates identically in
# regorus (embedded) and OPA v1 (server).

package casf

default allow := false

read_tools := {
	"cliniccloud.list_appointments",
	"cliniccloud.summary_history",
}

write_tools := {
	"cliniccloud.create_appointment",
	"cliniccloud.cancel_appointment",
	"twilio.send_sms",
	"stripe.generate_invoice",
}

# Tools whose request must name the patient (`subject.patient_id`).
patient_tools := {
	"cliniccloud.summary_history",
	"twilio.send_sms",
}

known_roles := {"receptionist", "nurse", "doctor", "billing", "custodian", "system"}

# Modes in which read tools may run (everything but KILL_SWITCH; an
# unrecognised mode is treated as closed).
read_modes := {"ALLOW", "STEP_UP", "READ_ONLY"}

has_tenant_id if {
	is_string(input.context.tenant_id)
	input.context.tenant_id != ""
}

known_role if input.role in known_roles

missing_patient_id if {
	input.tool in patient_tools
	not has_patient_id
}

has_patient_id if {
	is_string(input.subject.patient_id)
	input.subject.patient_id != ""
}

# The mode permits this tool (reads: any mode but KILL_SWITCH; writes: ALLOW only).
mode_permits_tool if {
	input.tool in read_tools
	input.mode in read_modes
}

mode_permits_tool if {
	input.tool in write_tools
	input.mode == "ALLOW"
}

allow if {
	has_tenant_id
	known_role
	not missing_patient_id
	mode_permits_tool
}

violations contains "Mode_KillSwitch" if input.mode == "KILL_SWITCH"

violations contains "Mode_ReadOnly_NoWrite" if {
	input.mode == "READ_ONLY"
	input.tool in write_tools
}

violations contains "BadRequest_MissingTenantId" if not has_tenant_id

violations contains "BadRequest_MissingPatientId" if missing_patient_id

violations contains "BadRequest_UnknownRole" if not known_role
