"""The built-in device profiles (YAML files). The wheel installs this folder as ``edgeq.device_profiles``
through a setuptools package-dir mapping; ``edgeq.profiles`` reads it with importlib.resources."""
