# What the injected proxy gets: `proxy` names the ConfigMap of its config file, the ConfigMap of
# its tool policy and the Secret of its upstream credentials, each in the pod's own namespace
# (null: none). The webhook mounts them into the proxy container only.
#
# Who chooses what:
# - the tool policy is the platform's (settings proxy.policy_config_map): a workload never
#   chooses it, since it is what decides the agent's tool calls, prompts and resources;
# - the config is the platform's (proxy.config_map) unless the workload names its own with the
#   annotation agentvm.dev/proxy-config (when proxy.workload_config_map allows it). Its upstreams
#   are no more than the pod can reach anyway: the agent shares the proxy's network;
# - the credentials go only with a config from the same party: the platform's Secret
#   (proxy.credentials_secret) with the platform's config, never with a workload's. A workload
#   may name its own Secret with agentvm.dev/proxy-credentials (when
#   proxy.workload_credentials_secret allows it), never the platform's.
#
# Add `deny` rules of your own to veto names (a prefix per team, say); replace this file in your
# copy of the policies to decide the names otherwise (per namespace label, for instance).
package agentvm

proxy_config_annotation := "agentvm.dev/proxy-config"

proxy_credentials_annotation := "agentvm.dev/proxy-credentials"

proxy := {
	"config_map": proxy_config_map,
	"policy_config_map": settings.proxy.policy_config_map,
	"credentials_secret": proxy_credentials_secret,
}

# The value of an annotation of the pod; undefined when absent.
workload_names(key) := name if {
	name := input.pod.metadata.annotations[key]
}

proxy_config_map := name if {
	name := workload_names(proxy_config_annotation)
} else := settings.proxy.config_map

proxy_credentials_secret := name if {
	name := workload_names(proxy_credentials_annotation)
} else := settings.proxy.credentials_secret if {
	not workload_names(proxy_config_annotation)
} else := null

workload_choice_allowed(key) if {
	key == proxy_config_annotation
	settings.proxy.workload_config_map == true
}

workload_choice_allowed(key) if {
	key == proxy_credentials_annotation
	settings.proxy.workload_credentials_secret == true
}

setting_of(key) := "proxy.workload_config_map" if key == proxy_config_annotation

setting_of(key) := "proxy.workload_credentials_secret" if key == proxy_credentials_annotation

# A ConfigMap or Secret name, as the API server checks it.
object_name(name) if {
	is_string(name)
	count(name) <= 253
	regex.match(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`, name)
}

deny contains msg if {
	input.action == "admit"
	some key in [proxy_config_annotation, proxy_credentials_annotation]
	workload_names(key)
	not workload_choice_allowed(key)
	msg := sprintf("annotation %v is not allowed here: the platform chooses what the proxy gets (setting %v is false)", [key, setting_of(key)])
}

deny contains msg if {
	input.action == "admit"
	some key in [proxy_config_annotation, proxy_credentials_annotation]
	name := workload_names(key)
	not object_name(name)
	msg := sprintf("annotation %v: %v is not a ConfigMap or Secret name (lowercase letters, digits, '-' and '.')", [key, name])
}

deny contains msg if {
	input.action == "admit"
	name := workload_names(proxy_credentials_annotation)
	name == settings.proxy.credentials_secret
	msg := sprintf("annotation %v cannot name %v, the platform's credentials Secret: it goes only with the platform's proxy config", [proxy_credentials_annotation, name])
}

# In a namespace that makes every pod an agent, no pod may read the namespace's Secrets; a
# workload cannot hand one to its proxy (and so to its own config's upstreams) either.
deny contains msg if {
	input.action == "admit"
	workload_names(proxy_credentials_annotation)
	object.get(object.get(input, "namespace", {}), "labels", {})["agentvm.dev/enforce"] == "true"
	msg := sprintf("annotation %v is not allowed in namespace %v, where every pod is an agent: no pod there may read its Secrets", [proxy_credentials_annotation, input.namespace.name])
}
