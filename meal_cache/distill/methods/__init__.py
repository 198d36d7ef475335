"""The distillation methods, one file each; every Method subclass with a name in a module here is registered."""
