"""The fleet controller: `oak-agent fleet deploy|delete|status|abort`.

`config` reads controller.toml, `plan` holds the rollout's record and its pure rules (which
cameras, which waves, when to abort), `controller` drives a rollout over MQTT, `progress`
shows it, `cli` is the command line.
"""

__all__: list[str] = []
