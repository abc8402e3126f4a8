package agentvm

pod_annotated(annotations) := {
	"action": "admit",
	"pod": {"metadata": {"annotations": annotations}, "spec": {"containers": [{"name": "a", "image": "i"}]}},
	"namespace": {"name": "team-a", "labels": null},
}

platform := {"proxy": {
	"config_map": "agentvm-proxy",
	"policy_config_map": "agentvm-tools",
	"credentials_secret": "agentvm-proxy-credentials",
}}

test_nothing_is_mounted_by_default if {
	proxy == {"config_map": null, "policy_config_map": null, "credentials_secret": null} with input as pod_annotated({})
	count(deny) == 0 with input as pod_annotated({})
}

test_the_platform_names_everything_by_default if {
	p := proxy with input as pod_annotated({}) with data.agentvm_settings as platform
	p == platform.proxy
}

test_a_workload_config_replaces_the_platform_config_and_drops_its_credentials if {
	inp := pod_annotated({"agentvm.dev/proxy-config": "team-tools"})
	p := proxy with input as inp with data.agentvm_settings as platform
	p == {"config_map": "team-tools", "policy_config_map": "agentvm-tools", "credentials_secret": null}
	count(deny) == 0 with input as inp with data.agentvm_settings as platform
}

test_a_workload_brings_its_own_credentials if {
	inp := pod_annotated({"agentvm.dev/proxy-config": "team-tools", "agentvm.dev/proxy-credentials": "team-tokens"})
	p := proxy with input as inp with data.agentvm_settings as platform
	p.credentials_secret == "team-tokens"
	p.policy_config_map == "agentvm-tools"
}

test_workload_credentials_go_with_the_platform_config if {
	inp := pod_annotated({"agentvm.dev/proxy-credentials": "team-tokens"})
	p := proxy with input as inp with data.agentvm_settings as platform
	p == {"config_map": "agentvm-proxy", "policy_config_map": "agentvm-tools", "credentials_secret": "team-tokens"}
}

test_workload_choice_can_be_switched_off if {
	off := {"proxy": {"workload_config_map": false, "workload_credentials_secret": false}}
	inp := pod_annotated({"agentvm.dev/proxy-config": "x", "agentvm.dev/proxy-credentials": "y"})
	msgs := deny with input as inp with data.agentvm_settings as off
	count(msgs) == 2
	some msg in msgs
	contains(msg, "proxy.workload_credentials_secret is false")
}

test_a_workload_cannot_name_the_platform_secret if {
	inp := pod_annotated({"agentvm.dev/proxy-config": "x", "agentvm.dev/proxy-credentials": "agentvm-proxy-credentials"})
	some msg in deny with input as inp with data.agentvm_settings as platform
	contains(msg, "the platform's credentials Secret")
}

test_bad_names_are_denied_with_the_name if {
	inp := pod_annotated({"agentvm.dev/proxy-config": "Team_Tools"})
	some msg in deny with input as inp
	contains(msg, "Team_Tools is not a ConfigMap or Secret name")
}

test_no_workload_credentials_in_an_enforcing_namespace if {
	inp := object.union(pod_annotated({"agentvm.dev/proxy-credentials": "y"}), {"namespace": {"labels": {"agentvm.dev/enforce": "true"}}})
	some msg in deny with input as inp
	contains(msg, "namespace team-a, where every pod is an agent")
	count(deny) == 0 with input as pod_annotated({"agentvm.dev/proxy-credentials": "y"})
}

test_other_actions_are_not_checked if {
	inp := object.union(pod_annotated({"agentvm.dev/proxy-config": "Bad"}), {"action": "update"})
	count(deny) == 0 with input as inp
}
