"""The control plane: every operation the API offers is an action (``actions.py``), applied by one
``Controller`` (``controller.py``). The API only decodes a request into an action and encodes the result;
the controller never sees HTTP, and only it reaches into the hypervisor, the snapshot store and the devices."""
