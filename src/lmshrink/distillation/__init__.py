"""lmshrink.distillation"""
