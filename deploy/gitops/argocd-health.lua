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
-- In order: Stalled (rekey will not proceed without a person), Degraded (retrying something that
-- fails), suspended, a rotation in flight, the key in place.
local verdicts = {
  {"Stalled", "Degraded"},
  {"Degraded", "Degraded"},
  {"Rotating", "Progressing"},
  {"Ready", "Healthy"},
}
for i, v in ipairs(verdicts) do
  if v[1] == "Rotating" and obj.spec ~= nil and obj.spec.suspend == true then
    hs.status = "Suspended"
    hs.message = "spec.suspend is true: no rotation starts"
    return hs
  end
  if is_true(v[1]) then
    hs.status = v[2]
    hs.message = describe(v[1])
    return hs
  end
end
hs.status = "Progressing"
if c["Ready"] ~= nil then
  hs.message = describe("Ready")
else
  hs.message = "Waiting for rekey to report Ready"
end
return hs
