"""The console commands, one module each (`ddpm-sample` is `ddpm_hf.commands.sample`, runnable with `python -m`):
each parses its flags with no heavy import, then calls the library. `parsing` and `running` are what they share."""
