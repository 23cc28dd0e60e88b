-- Argo CD health check for rekey.dev/IamKeyRotation (Lua 5.1, as Argo CD runs it).
-- Install it in argocd-cm under resource.customizations.health.rekey.dev_IamKeyRotation
-- (docs/gitops.md). A rotation in flight is Progressing, a rotation that needs attention is
-- Degraded, a resource whose key is in place is Healthy.
local hs = {}
local status = obj.status
if status == nil or status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for rekey to report a status"
  return hs
end
if obj.metadata.generation ~= nil and status.observedGeneration ~= nil
    and status.observedGeneration < obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "rekey has not yet seen the latest spec"
  return hs
end
local c = {}
for _, cond in ipairs(status.conditions) do
  c[cond.type] = cond
end
local function is_true(t)
  return c[t] ~= nil and c[t].status == "True"
end
local function describe(t)
  return t .. "/" .. (c[t].reason or "") .. ": " .. (c[t].message or "")
end
-- Stalled: rekey will not proceed without a person. Degraded: it is retrying something that fails.
if is_true("Stalled") then
  hs.status = "Degraded"
  hs.message = describe("Stalled")
  return hs
end
if is_true("Degraded") then
  hs.status = "Degraded"
  hs.message = describe("Degraded")
  return hs
end
if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "spec.suspend is true: no rotation starts"
  return hs
end
if is_true("Rotating") then
  hs.status = "Progressing"
  hs.message = describe("Rotating")
  return hs
end
if is_true("Ready") then
  hs.status = "Healthy"
  hs.message = describe("Ready")
  return hs
end
hs.status = "Progressing"
if c["Ready"] ~= nil then
  hs.message = describe("Ready")
else
  hs.message = "Waiting for rekey to report Ready"
end
return hs
